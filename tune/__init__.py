"""Evaluation-guided merging: Optuna studies of a method's parameters on validation data (mbmerge
tune; successive halving, Ray) and Hi-Merging, scoring candidate merges through the eval layer into a
score store shared by both."""


def require_extra() -> None:
    """One line instead of an ImportError when the tune extra (Optuna, SQLAlchemy) is not installed."""
    import importlib.util
    missing = [m for m in ("optuna", "sqlalchemy") if importlib.util.find_spec(m) is None]
    if missing:
        from ..common.errors import BadParameter
        raise BadParameter(f"tuning needs the tune extra ({missing[0]} is missing): pip install 'mbmerge[tune]'")
