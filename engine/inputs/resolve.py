"""Model references -> local folders: a path; a Hugging Face Hub repo id (`owner/name[@rev]`,
downloaded with only the files a merge needs; HF_HOME, HF_HUB_CACHE and HF_HUB_OFFLINE are
read at call time); or a MergeBench domain short name, resolved against the base family
(`--base google/gemma-2-2b --experts math` -> MergeBench/gemma-2-2b_math). Knows nothing of
tensors.
"""
import os
from dataclasses import dataclass, replace
from pathlib import Path

from ...common.errors import BadModel, UnknownExpert
from ...common.names import DOMAIN_ALIASES, HUB_ID, is_domain, mergebench_repo

HUB_PATTERNS = ["*.safetensors", "model.safetensors.index.json", "config.json", "generation_config.json",
                "tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json",
                "added_tokens.json", "vocab.json", "vocab.txt", "merges.txt", "chat_template.jinja",
                "adapter_config.json"]


@dataclass(frozen=True, kw_only=True)
class Source:
    """A resolved model: what the user wrote, where it lies, its hub revision if any, and the LoRA adapter
    folded into it, if any (mergekit's `model+adapter`, or an adapter folder given for the base)."""
    ref: str
    path: Path
    revision: str | None
    role: str          # "base" or "expert <name>"
    adapter: Path | None = None

    @property
    def folders(self) -> list[Path]:
        return [self.path] + ([self.adapter] if self.adapter else [])


def resolve(ref: str, role: str, base_ref: str | None = None) -> Source:
    """Resolve one model reference to a local folder.

    Args:
        ref: a folder, a hub id (optionally @revision), or a MergeBench domain short name.
        role: "base" or "expert NAME", used in messages.
        base_ref: the base's reference, needed to resolve a domain short name.
    """
    if len(refs := parts(ref)) == 2:                   # mergekit's model+adapter
        return replace(resolve(refs[0], role, base_ref), ref=ref, adapter=resolve(refs[1], role).path)
    repo = hub_repo(ref, role, base_ref)
    return Source(ref=ref, path=Path(ref), revision=None, role=role) if repo is None else _download(repo, role, ref)


def parts(ref: str) -> list[str]:
    """[model, adapter] of mergekit's `model+adapter` reference, else [ref]."""
    return ref.split("+", 1) if "+" in ref and not os.path.exists(ref) else [ref]


def hub_repo(ref: str, role: str, base_ref: str | None = None) -> str | None:
    """The hub repository `ref` names, or None for an existing folder; the reference's error (no such
    folder, a domain without a base, not a reference at all) before anything is downloaded."""
    if os.path.exists(ref):
        return None
    if os.path.isabs(ref) or ref.startswith((".", "~")) or ref.partition("@")[0].count("/") > 1:
        raise BadModel(f"{_who(role, ref)}: no such folder")
    if is_domain(ref):
        if base_ref is None:
            raise UnknownExpert(f"{_who(role, ref)} is a MergeBench domain; pass --base to say which "
                                f"family (e.g. --base google/gemma-2-2b)")
        return mergebench_repo(base_ref, ref)
    if HUB_ID.match(ref):
        return ref
    raise UnknownExpert(f"{_who(role, ref)} is not a folder, a hub id (owner/name) or a MergeBench domain "
                        f"({', '.join(sorted(DOMAIN_ALIASES))})")


def _who(role: str, ref: str) -> str:
    """'expert math' for role 'expert math', else 'base google/gemma-2-2b'."""
    return role if role.endswith(ref) else f"{role} {ref}"


def _download(repo: str, role: str, ref: str) -> Source:
    from huggingface_hub import snapshot_download  # imported lazily: only hub references need it

    repo_id, _, revision = repo.partition("@")
    offline = os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    hf_home = os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface"))
    cache = os.environ.get("HF_HUB_CACHE") or os.path.join(hf_home, "hub")
    try:
        path = snapshot_download(repo_id, revision=revision or None, allow_patterns=HUB_PATTERNS,
                                 cache_dir=cache, local_files_only=offline)
    except Exception as e:  # the hub client raises many types (offline, 404, gated, network)
        if offline:
            raise UnknownExpert(f"{_who(role, ref)}: not a local folder, and hub repo {repo} is not in the "
                                f"offline cache {cache} (HF_HUB_OFFLINE is set)") from None
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UnknownExpert(f"{_who(role, ref)}: not a local folder, and hub repo {repo} could not be "
                            f"downloaded ({type(e).__name__}: {why[:200]})") from None
    path = Path(path)
    return Source(ref=ref, path=path, revision=path.name, role=role)
