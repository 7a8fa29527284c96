"""What `mbmerge tokensurgeon` is asked, checked where it enters: mergekit-tokensurgeon 0.1.5's options and
defaults, and the methods mbmerge implements of the ones it lists. Imports no torch."""
from dataclasses import asdict, dataclass

from ...common.errors import BadParameter

METHODS = ("omp", "common_interpolation", "subword", "mean", "zero", "randn")
NOT_IMPLEMENTED = ("john_hewitt", "landmark_pca", "stb", "mp_rope")       # mergekit's, not (yet) mbmerge's
NEED_DONOR_ROWS = ("omp", "common_interpolation")    # the others never read the donor's weights
SCHEMES = ("distance_proportional", "barycentric", "least_squares")
SUBWORD = ("mean", "sum", "weighted_mean", "first_last")
MATCH = ("no", "embed", "lm_head", "yes")            # where byte and prefix matches are allowed
DTYPES = {"bfloat16": "BF16", "float16": "F16", "float32": "F32"}


@dataclass(frozen=True, kw_only=True)
class Options:
    method: str = "omp"
    k: int = 64                                  # rows combined per new token (omp, common_interpolation)
    weight_scheme: str = "distance_proportional"   # common_interpolation's weights
    cosine_similarity: bool = False              # common_interpolation's distance
    subword_method: str = "mean"
    prefix_match: str = "no"
    byte_match: str = "no"
    new_vocab_noise: float | None = None         # std of gaussian noise added to new rows
    new_vocab_scale: float | None = None         # factor on new rows (after the noise)
    batch_size: int | None = None                # new tokens approximated at once (None: from the memory bound)
    seed: int = 0                                # of the noise and of randn
    dtype: str | None = None                     # output dtype of float tensors (None: as stored)
    progress: bool = True

    def __post_init__(self):
        if self.method in NOT_IMPLEMENTED:
            raise BadParameter(f"approximation method {self.method} is mergekit's but not implemented in mbmerge "
                               f"tokensurgeon (supported: {', '.join(METHODS)})")
        for name, value, allowed in [("approximation method", self.method, METHODS),
                                     ("--weight-scheme", self.weight_scheme, SCHEMES),
                                     ("--subword-method", self.subword_method, SUBWORD),
                                     ("--prefix-match", self.prefix_match, MATCH),
                                     ("--byte-match", self.byte_match, MATCH),
                                     ("--dtype", self.dtype or "bfloat16", tuple(DTYPES))]:
            if value not in allowed:
                raise BadParameter(f"{name} {value!r} is not one of {', '.join(allowed)}")
        if self.k < 1:
            raise BadParameter(f"-k {self.k} must be at least 1")
        if self.batch_size is not None and self.batch_size < 1:
            object.__setattr__(self, "batch_size", None)   # mergekit's -1 (no batching): the memory bound's
        if self.new_vocab_noise is not None and self.new_vocab_noise < 0:
            raise BadParameter(f"--new-vocab-noise {self.new_vocab_noise} must be a standard deviation (>= 0)")

    def matches(self, head: bool) -> tuple[bool, bool]:
        """(byte, prefix): whether the embedding's (or the head's) tokens may match by byte and by prefix."""
        where = ("yes", "lm_head" if head else "embed")
        return self.byte_match in where, self.prefix_match in where

    def as_dict(self) -> dict:
        """The options that decide the output (for the card), those of other methods left out."""
        shown = {k: v for k, v in asdict(self).items() if k not in ("progress", "batch_size")}
        if self.method not in ("omp", "common_interpolation"):
            shown.pop("k")
        if self.method != "common_interpolation":
            shown.pop("weight_scheme")
            shown.pop("cosine_similarity")
        if self.method != "subword":
            shown.pop("subword_method")
        if self.method != "randn" and not self.new_vocab_noise:
            shown.pop("seed")
        return shown

    @property
    def out_dtype(self) -> str | None:
        """The safetensors dtype name of --dtype (None: as stored)."""
        return DTYPES[self.dtype] if self.dtype else None
