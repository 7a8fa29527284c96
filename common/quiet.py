"""Quieting transformers, which the zoo's training, the statistics' collectors and the evaluation's
lm-eval runs all load models through: its warnings and loading bars off while our own progress says
what happens. transformers is imported when the quiet starts, not with this module."""
import contextlib


@contextlib.contextmanager
def quiet_transformers():
    """transformers' warnings and loading bars off (our own progress says what happens), restored after."""
    from transformers.utils import logging as hf_logging
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        bars and hf_logging.enable_progress_bar()
