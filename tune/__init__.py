"""Evaluation-guided merging: Optuna studies of a method's parameters on validation data (mbmerge
tune; successive halving, Ray) and Hi-Merging, scoring candidate merges through the eval layer into a
score store shared by both."""


def require_extra() -> None:
    """One line instead of an ImportError when the tune extra (Optuna, SQLAlchemy) is not installed."""
    try:
        import optuna  # noqa: F401
        import sqlalchemy  # noqa: F401
    except ImportError as e:
        from ..common.errors import BadParameter
        raise BadParameter(f"tuning needs the tune extra ({e.name} is missing): pip install 'mbmerge[tune]'") from None
