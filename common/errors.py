"""The errors a user can cause. Each message is one line: what is wrong, where, what to do.

The command line prints `mbmerge: error: <message>` and exits non-zero for these; anything
else is a bug and keeps its traceback.
"""


class MbmergeError(Exception):
    """Base of every user-facing error."""


class BadHeader(MbmergeError):
    """A safetensors header that is too long, not JSON, or describes impossible tensors."""


class BadOffsets(MbmergeError):
    """Tensor data offsets outside the file, overlapping, or leaving holes."""


class BadModel(MbmergeError):
    """A model folder that is missing, has no safetensors, or whose index is unsafe."""


class ShapeMismatch(MbmergeError):
    """An expert whose tensors disagree with the base in shape or dtype."""


class MissingTensor(MbmergeError):
    """A tensor that one input has and another lacks."""


class UnknownExpert(MbmergeError):
    """A model reference that is neither a folder, a hub id, nor a MergeBench domain."""


class BadParameter(MbmergeError):
    """An unknown method, an unknown parameter, or a value out of range."""


class NonFinite(MbmergeError):
    """NaN or Inf in an input tensor."""


class OutputExists(MbmergeError):
    """The output folder exists and is not empty."""


class OutputLocation(MbmergeError):
    """An output that cannot be written where it was asked for, or would overwrite an input."""


class OutputBusy(MbmergeError):
    """Another mbmerge is writing the same output folder."""


class InputChanged(MbmergeError):
    """An input file changed while it was being merged."""


class MethodFailed(MbmergeError):
    """A merge method that failed on a tensor (e.g. an SVD that did not converge)."""
