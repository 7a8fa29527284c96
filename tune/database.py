"""Where tuning keeps what it learns: one SQL database (SQLite in the mbmerge cache by default, or any
URL SQLAlchemy and Optuna accept, so a shared server serves many machines) that holds the Optuna
studies and mbmerge's score store.

The score store maps a key (what fixes a merge's bytes, the task and the range of its examples:
tune.score) to a score and the seconds it took. Entries are only ever inserted, never rewritten: a
key scored twice keeps the first score, so writers in many processes or machines cannot lose each
other's entries (no read-modify-write of a file).
"""
import contextlib
import fcntl
import functools
import time
from pathlib import Path

import sqlalchemy as sa

from ..common.cache import cache_dir
from ..common.errors import BadParameter

_META = sa.MetaData()
SCORES = sa.Table(
    "mbmerge_scores", _META,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("score", sa.Float, nullable=True),            # None: a task that did not run (code execution off)
    sa.Column("examples", sa.Integer, nullable=False),
    sa.Column("merge_seconds", sa.Float, nullable=False),
    sa.Column("validation_seconds", sa.Float, nullable=False),
    sa.Column("created", sa.Float, nullable=False),
)
LOCKS = sa.Table("mbmerge_locks", _META, sa.Column("name", sa.String(255), primary_key=True))


def default_url() -> str:
    return f"sqlite:///{cache_dir() / 'tune.db'}"


def sqlite_path(url: str) -> Path | None:
    """The file of a sqlite:/// URL (None for other databases)."""
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


@functools.cache
def engine(url: str) -> sa.Engine:
    """The database at `url`, its mbmerge tables created (one engine a URL: it pools connections)."""
    path = sqlite_path(url)
    try:
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
        # SQLite: wait for another writer's lock instead of failing at once
        e = sa.create_engine(url, connect_args={"timeout": 60} if path else {}, pool_pre_ping=not path)
        retrying(lambda: _META.create_all(e))
    except (OSError, sa.exc.SQLAlchemyError, ValueError) as err:
        raise BadParameter(f"tuning database {url}: {str(err).splitlines()[0]}") from None
    return e


def retrying(make, attempts: int = 5):
    """make(), again after a pause when it fails: two processes creating one database's tables at
    once race between "is it there?" and "create it" (the loser sees "already exists")."""
    for attempt in range(attempts):
        try:
            return make()
        except (sa.exc.OperationalError, sa.exc.IntegrityError, sa.exc.ProgrammingError):
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * 2 ** attempt)


class ScoreStore:
    """{key: {"score", "examples", "merge_seconds", "validation_seconds"}} in table mbmerge_scores."""

    def __init__(self, url: str | None = None):
        self.url = url or default_url()
        self.engine = engine(self.url)

    def get(self, keys) -> dict[str, dict]:
        """The stored entries among `keys` (absent keys are left out)."""
        keys, out = list(dict.fromkeys(keys)), {}
        with self.engine.connect() as c:
            for i in range(0, len(keys), 500):     # SQLite's limit on bound parameters
                rows = c.execute(sa.select(SCORES).where(SCORES.c.key.in_(keys[i:i + 500])))
                out.update({r.key: {"score": r.score, "examples": r.examples, "merge_seconds": r.merge_seconds,
                                    "validation_seconds": r.validation_seconds} for r in rows})
        return out

    def put(self, entries: dict[str, dict]) -> None:
        """Insert entries whose key is not stored yet (another process may have stored some meanwhile:
        the first score stays): all in one transaction, else one by one."""
        rows = [{"key": key, "created": time.time(), **{k: e[k] for k in ("score", "examples", "merge_seconds",
                                                                          "validation_seconds")}}
                for key, e in entries.items()]
        if not rows:
            return
        try:
            with self.engine.begin() as c:
                c.execute(SCORES.insert(), rows)
            return
        except sa.exc.IntegrityError:
            pass
        for row in rows:
            try:
                with self.engine.begin() as c:
                    c.execute(SCORES.insert().values(**row))
            except sa.exc.IntegrityError:
                pass


@contextlib.contextmanager
def mutex(url: str, name: str):
    """Held by one process at a time, on any machine that reaches the database: a file lock beside a
    SQLite file (SQLite's own write lock would also block Optuna's writes inside the block), else a
    row lock (SELECT ... FOR UPDATE) in table mbmerge_locks, held by an open transaction."""
    path = sqlite_path(url)
    if path:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path.with_name(path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)
        return
    e = engine(url)
    with contextlib.suppress(sa.exc.IntegrityError), e.begin() as c:
        c.execute(LOCKS.insert().values(name=name))
    with e.begin() as c:
        c.execute(sa.select(LOCKS).where(LOCKS.c.name == name).with_for_update())
        yield
