"""Names every layer shares, each written once: MergeBench's domains and their command-line aliases,
its base models on the Hub and the naming of its expert repos, and what a hub id looks like."""
import re

MERGEBENCH_DOMAINS = ("instruction", "math", "multilingual", "coding", "safety")
# what users type -> the domain ('code' and 'ifeval' as mbmerge's flags and MergeBench's scripts say them)
DOMAIN_ALIASES = {"math": "math", "code": "coding", "coding": "coding", "multilingual": "multilingual",
                  "instruction": "instruction", "ifeval": "instruction", "safety": "safety"}
# MergeBench's eight bases, by family name (lower case): MergeBench/{base name}_{domain} are their experts
MERGEBENCH_BASES = {b.split("/")[-1].lower(): b for b in (
    "google/gemma-2-2b", "google/gemma-2-2b-it", "google/gemma-2-9b", "google/gemma-2-9b-it",
    "meta-llama/Llama-3.2-3B", "meta-llama/Llama-3.2-3B-Instruct",
    "meta-llama/Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct")}
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(@[\w./-]+)?$")   # owner/name[@revision]


def is_domain(ref: str) -> bool:
    return ref.lower() in DOMAIN_ALIASES


def domain_names(refs) -> list[str] | None:
    """Each reference's domain ('code' -> 'coding'), when every one of them names a domain; else None."""
    return [DOMAIN_ALIASES[r.lower()] for r in refs] if all(is_domain(r) for r in refs) else None


def mergebench_repo(base_ref: str, domain: str) -> str:
    """MergeBench's expert repo for a base and a domain (or alias): MergeBench/{base name}_{domain}.

    Example: mergebench_repo("google/gemma-2-2b@main", "code") == "MergeBench/gemma-2-2b_coding"
    """
    name = base_ref.split("@")[0].rstrip("/").split("/")[-1]
    return f"MergeBench/{name}_{DOMAIN_ALIASES[domain.lower()]}"

KERNEL_BACKENDS = ("auto", "torch", "triton")   # --kernels: see mbmerge.kernels
ZOO_SIZES = ("full", "micro")                   # the mini zoo (the built-in family): mbmerge.eval.zoo
