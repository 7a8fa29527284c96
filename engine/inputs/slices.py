"""A recipe's slices (frankenmerges, layer stacking) as the merge's inputs. Slice s lists sources
(model, first layer, end layer), all of one length; output layer k of slice s is layer first + (k - the
slice's first output layer) of each source. Merge input j (the base first, where the method uses it) is
one virtual model: a TensorIndex whose tensors carry the output's names and lie in the files of the
model slice s takes at position j. Embeddings come from the first slice's sources and the other tensors
outside the layers from the last slice's, as mergekit plans them. Reads headers, never tensor data.
"""
from dataclasses import replace

from ...common import roles
from ...common.errors import BadParameter
from .index import TensorIndex


def layer_count(index: TensorIndex) -> int:
    return roles.layer_count(index.tensors)


def virtual_inputs(slices: list, indexes: dict[str, TensorIndex]) -> list[TensorIndex]:
    """One TensorIndex per merge input (a position in every slice), from each source model's index
    (`indexes`: reference -> index); BadParameter naming the slice and source for a layer range out of
    bounds."""
    for s, sources in enumerate(slices):
        for j, (ref, first, end) in enumerate(sources):
            have = layer_count(indexes[ref])
            if end > have:
                raise BadParameter(f"slices[{s}].sources[{j}] ({ref}): layer_range [{first}, {end}] goes past its "
                                   f"{have} layers (0 to {have - 1})")
    return [_position(slices, indexes, j) for j in range(len(slices[0]))]


def _position(slices: list, indexes: dict, j: int) -> TensorIndex:
    tensors, out_layer = {}, 0
    for sources in slices:
        ref, first, end = sources[j]
        index = indexes[ref]
        for k in range(end - first):     # layer by layer: the output's files in order of first use
            for name, e in index.tensors.items():
                if roles.layer_of(name) == first + k:
                    renamed = roles.renumbered(name, out_layer + k)
                    tensors[renamed] = replace(e, name=renamed, file=e.file.absolute())
        out_layer += end - first
    for sources, pre in ((slices[0], True), (slices[-1], False)):
        index = indexes[sources[j][0]]
        for name, e in index.tensors.items():
            if roles.layer_of(name) is None and roles.before_layers(name) == pre:
                tensors[name] = replace(e, file=e.file.absolute())
    files = tuple(dict.fromkeys(str(e.file) for e in tensors.values()))    # in order of first use
    first_model = indexes[slices[0][j][0]]
    return TensorIndex(folder=first_model.folder, tensors=tensors, shards=files, sharded=True,
                       metadata=first_model.metadata)

