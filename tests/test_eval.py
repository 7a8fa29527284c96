"""The evaluation layer: metrics arithmetic by hand, the zoo's generated lm-eval tasks, lm-eval end
to end on a tiny random model (char-level tokenizer, as the zoo's), the score cache, `mbmerge eval`."""
import json
import shutil
from dataclasses import dataclass

import pytest
from click.testing import CliRunner

from mbmerge.bin.eval import evaluate as eval_cmd
from mbmerge.common import domains
from mbmerge.eval import domain_tasks, harness, tasks
from mbmerge.eval.metrics import forgetting, normalised_performance


# --- metrics, by hand ---------------------------------------------------------------------------

def test_normalised_performance_by_hand():
    scores = {"math": 0.3, "coding": 0.5, "safety": 0.2, "instruction": None}
    experts = {"math": 0.6, "coding": 0.4, "safety": 0.0, "instruction": 0.9}
    np_ = normalised_performance(scores, experts)
    assert np_["per_domain"] == {"math": pytest.approx(0.5), "coding": pytest.approx(1.25), "safety": None,
                                 "instruction": None}  # zero expert and missing score are left out
    assert np_["mean"] == pytest.approx((0.5 + 1.25) / 2)
    assert normalised_performance({}, {"math": 0.0})["mean"] is None
    assert normalised_performance(scores, experts, ["math"]) == {"mean": pytest.approx(0.5),
                                                                 "per_domain": {"math": pytest.approx(0.5)}}


def test_forgetting_by_hand():
    base = {"a": 0.8, "b": 0.5, "c": 0.0, "d": 0.4}
    merged = {"a": 0.6, "b": 0.6, "c": 0.1}
    f = forgetting(merged, base)
    assert f["per_task"] == {"a": pytest.approx(0.25), "b": pytest.approx(-0.2), "c": None, "d": None}
    assert f["mean"] == pytest.approx((0.25 - 0.2) / 2)


def test_domain_scores_mean_of_tasks():
    t1, t2, t3 = (domain_tasks.Task(name=n, metric="acc,none") for n in ("t1", "t2", "t3"))
    p = {"x": (t1, t2), "y": (t3,)}
    assert harness.domain_scores(p, {"t1": 0.2, "t2": 0.6, "t3": None}) == {"x": pytest.approx(0.4), "y": None}


# --- a tiny random model with the zoo's character tokenizer -----------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Two tiny random Llama folders (seeds 0 and 1), vocabulary = the zoo's characters."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    from mbmerge.eval import zoo
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          num_key_value_heads=1, vocab_size=zoo.V, max_position_embeddings=256,
                          bos_token_id=zoo.BOS, eos_token_id=zoo.EOS, pad_token_id=zoo.PAD)
        folder = root / f"m{seed}"
        LlamaForCausalLM(cfg).save_pretrained(folder)
        for name, obj in zoo.tokenizer_files().items():
            (folder / name).write_text(json.dumps(obj))
        out[seed] = folder
    return out


@dataclass(frozen=True)
class Echo:
    """A stand-in domain: exact match of the first line against `answer`; remembers completions."""
    name: str
    answers: tuple = ()
    max_new_tokens: int = 6
    seen: dict = None

    def examples(self, split, n, seed=0):
        return [{"prompt": f"{i} + {i} =", "answer": self.answers[i] if self.answers else "?"} for i in range(n)]

    def score(self, example, completion):
        if self.seen is not None:
            self.seen[example["prompt"]] = completion
        return float(domains.first_line(completion) == example["answer"])


def test_generated_tasks_load_in_lm_eval(tmp_path):
    from lm_eval.tasks import TaskManager
    names = tasks.write_tasks(tmp_path, [*domains.DOMAINS.values(), domains.GENERAL], n=4)
    assert set(names) == {*domain_tasks.MERGEBENCH_DOMAINS, "general"}
    tm = TaskManager(include_path=str(tmp_path), include_defaults=False)
    assert set(names.values()) <= set(tm.all_tasks)
    task = tm.load([names["math"]])["tasks"][names["math"]]
    docs = list(task.test_docs())
    ex = domains.DOMAINS["math"].examples("test", 4)
    assert [task.doc_to_text(d) for d in docs] == [e["prompt"] for e in ex]
    assert task.config.generation_kwargs["max_gen_toks"] == domains.DOMAINS["math"].max_new_tokens
    again = tmp_path / "again"
    tasks.write_tasks(again, [*domains.DOMAINS.values(), domains.GENERAL], n=4)
    assert (again / "mbmerge_zoo_math.jsonl").read_bytes() == (tmp_path / "mbmerge_zoo_math.jsonl").read_bytes()


def test_zoo_domains_end_to_end(tiny, tmp_path):
    """lm-eval scores every zoo domain (+ general) on a random model: numbers in [0, 1]."""
    p = domain_tasks.plan("zoo", zoo_tasks=domain_tasks.zoo_tasks_dir(n=3))
    scores = harness.evaluate(tiny[0], family="zoo", settings=harness.EvalSettings(limit=2),
                              zoo_tasks=p["math"][0].include)
    assert set(scores) == {*domain_tasks.MERGEBENCH_DOMAINS, "general"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())


def test_checker_scores_the_generation(tiny, tmp_path):
    """Pass 1 records what the model generates; pass 2 asks for exactly that: score 1 (and 0 before)."""
    seen = {}
    first = tasks.write_tasks(tmp_path / "t1", [Echo("echo", seen=seen)], n=3)
    t1 = domain_tasks.Task(name=first["echo"], metric="score,none", num_fewshot=0, include=str(tmp_path / "t1"))
    assert harness.evaluate_tasks(tiny[0], [t1], add_bos_token=True, cache=False) == {t1.name: 0.0}
    assert len(seen) == 3
    answers = tuple(domains.first_line(seen[f"{i} + {i} ="]) for i in range(3))
    assert "?" not in answers and all(answers), answers  # real generations, not empty lines
    # lm-eval sees what the zoo trains on and scores with (<s> + prompt, greedy): same generations
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from mbmerge.eval import zoo
    ref = zoo.greedy_completions(AutoModelForCausalLM.from_pretrained(tiny[0]).eval(),
                                 AutoTokenizer.from_pretrained(tiny[0]), list(seen), 6)
    assert [domains.first_line(c) for c in ref] == [domains.first_line(c) for c in seen.values()]
    tasks.write_tasks(tmp_path / "t2", [Echo("echo", answers=answers)], n=3)
    t2 = domain_tasks.Task(name=first["echo"], metric="score,none", num_fewshot=0, include=str(tmp_path / "t2"))
    assert harness.evaluate_tasks(tiny[0], [t2], add_bos_token=True, cache=False) == {t2.name: 1.0}


def test_ranges_of_examples_score_what_their_examples_score(tiny, tmp_path):
    """evaluate_ranges (tuning's halving rungs): the metric over examples start..stop-1, through
    lm-eval's limit from 0 and its samples after; known per-example scores: right on 0, 3, 4, 8."""
    seen = {}
    names = tasks.write_tasks(tmp_path / "t1", [Echo("echo", seen=seen)], n=10)
    t1 = domain_tasks.Task(name=names["echo"], metric="score,none", num_fewshot=0, include=str(tmp_path / "t1"))
    harness.evaluate_tasks(tiny[0], [t1], settings=harness.EvalSettings(batch_size=1), add_bos_token=True,
                           cache=False)
    right = {0, 3, 4, 8}
    answers = tuple(domains.first_line(seen[f"{i} + {i} ="]) if i in right else "?" for i in range(10))
    tasks.write_tasks(tmp_path / "t2", [Echo("echo", answers=answers)], n=10)
    t2 = domain_tasks.Task(name=names["echo"], metric="score,none", num_fewshot=0, include=str(tmp_path / "t2"))
    ranges = [(0, 10), (0, 4), (4, 10), (2, 7), (9, 10), (5, 5), (0, None)]
    got = harness.evaluate_ranges(tiny[0], [(t2, a, b) for a, b in ranges], add_bos_token=True, batch_size=1)
    want = [sum(i in right for i in range(a, b or 10)) / ((b or 10) - a) if b is None or b > a else None
            for a, b in ranges]
    assert got == want and harness.task_size(t2) == 10


def test_cache_prevents_second_run(tiny, tmp_path, monkeypatch):
    import lm_eval
    calls = []
    real = lm_eval.simple_evaluate
    monkeypatch.setattr(lm_eval, "simple_evaluate", lambda **kw: calls.append(kw["tasks"]) or real(**kw))
    zt, two = domain_tasks.zoo_tasks_dir(n=3), harness.EvalSettings(limit=2)
    first = harness.evaluate(tiny[0], domains=["math"], general=False, settings=two, zoo_tasks=zt)
    again = harness.evaluate(tiny[0], domains=["math"], general=False, settings=two, zoo_tasks=zt)
    assert first == again and len(calls) == 1
    harness.evaluate(tiny[1], domains=["math"], general=False, settings=two, zoo_tasks=zt)  # another model
    three = harness.EvalSettings(limit=3)
    harness.evaluate(tiny[0], domains=["math"], general=False, settings=three, zoo_tasks=zt)  # another limit
    assert len(calls) == 3
    copy = tmp_path / "copy"
    shutil.copytree(tiny[0], copy)  # same weights elsewhere: same identity, cached
    harness.evaluate(copy, domains=["math"], general=False, settings=two, zoo_tasks=zt)
    assert len(calls) == 3
    (copy / "mbmerge.json").write_text(json.dumps({"method": "ties", "wall_seconds": 1.5}))
    harness.evaluate(copy, domains=["math"], general=False, settings=two, zoo_tasks=zt)  # a merge record: its identity
    assert len(calls) == 4


def test_eval_command_report(tiny, tmp_path):
    """`mbmerge eval` on a 'merge' of a two-model zoo: runtime from mbmerge.json; NP and forgetting
    are the ratios of the scores it reports."""
    zoo = tmp_path / "zoo"
    shutil.copytree(tiny[0], zoo / "base")
    shutil.copytree(tiny[1], zoo / "math")
    merged = tmp_path / "merged"
    shutil.copytree(tiny[1], merged)
    (merged / "mbmerge.json").write_text(json.dumps({"method": "ties", "wall_seconds": 2.5}))
    out = tmp_path / "report.json"
    res = CliRunner().invoke(eval_cmd, [str(merged), "--domains", "math", "--zoo", str(zoo), "--limit", "2",
                                        "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads(out.read_text())
    assert rep["merge"] == {"method": "ties", "wall_seconds": 2.5}
    assert set(rep["scores"]) == {"math", "general"}
    # the merge has the expert's weights: same scores, so NP is 1 where the expert scores, F is (b - m) / b
    assert rep["experts"]["math"]["score"] == rep["scores"]["math"]
    e = rep["experts"]["math"]["score"]
    assert rep["normalised_performance"]["per_domain"]["math"] == (None if e == 0 else pytest.approx(1.0))
    b, m = rep["base"]["tasks"]["mbmerge_zoo_general"], rep["tasks"]["mbmerge_zoo_general"]
    assert rep["forgetting"]["per_task"]["mbmerge_zoo_general"] == (None if b == 0 else pytest.approx((b - m) / b))


# --- dry runs and the real registry -------------------------------------------------------------

def test_dry_run_zoo():
    res = CliRunner().invoke(eval_cmd, ["some/model", "--family", "zoo", "--zoo", "Z", "--limit", "5", "--dry-run"])
    assert "add_bos_token=True" in res.output
    assert res.exit_code == 0, res.output
    for d in (*domain_tasks.MERGEBENCH_DOMAINS, "general"):
        assert f"mbmerge_zoo_{d}" in res.output
    assert "limit=5 " in res.output and "apply_chat_template=False" in res.output and "Z/math" in res.output


def test_dry_run_gemma():
    res = CliRunner().invoke(eval_cmd, ["m", "--family", "gemma-2-2b", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.splitlines()
    heads = (*domain_tasks.MERGEBENCH_DOMAINS, "general")
    tasks_ = {ln.split()[1] for ln in lines if ln.split() and ln.split()[0] in heads}
    assert tasks_ == {"gsm8k_cot", "hendrycks_math", "ifeval", "humaneval_plus", "mbpp_plus", "toxigen",
                      "truthfulqa_mc2",
                      *(f"{t}_{l}" for t in ("m_mmlu", "arc", "hellaswag") for l in ("fr", "es", "de", "ru")),
                      "mmlu", "triviaqa", "squadv2", "coqa", "pubmedqa", "wmt14-fr-en"}
    assert any("gsm8k_cot" in ln and "exact_match,flexible-extract" in ln and "num_fewshot=8" in ln for ln in lines)
    assert "math=MergeBench/gemma-2-2b_math" in res.output and "base: google/gemma-2-2b" in res.output
    bad = CliRunner().invoke(eval_cmd, ["m", "--family", "gpt-5", "--dry-run"])
    assert bad.exit_code != 0 and "unknown family" in bad.output


def test_real_registry_names_exist_in_lm_eval():
    from lm_eval.tasks import TaskManager
    known = set(TaskManager().all_tasks)
    names = {t.name for ts in domain_tasks.MERGEBENCH.values() for t in ts}
    assert names - known == set()
    assert domain_tasks.expert_ref("Llama-3.2-3B", "coding") == "MergeBench/Llama-3.2-3B_coding"


def test_code_tasks_are_opt_in(tiny, monkeypatch):
    monkeypatch.delenv("HF_ALLOW_CODE_EVAL", raising=False)
    coding = domain_tasks.plan("gemma-2-2b", ["coding"], general=False)["coding"]
    assert harness.evaluate_tasks(tiny[0], coding) == {"humaneval_plus": None, "mbpp_plus": None}
    assert harness.domain_scores({"coding": coding}, {"humaneval_plus": None, "mbpp_plus": None}) == {"coding": None}


CACHE_WRITER = """
import sys
from pathlib import Path
from mbmerge.eval.harness import ScoreCache
cache = ScoreCache(Path(sys.argv[1]))
for i in range(200):
    cache.put({f"{sys.argv[2]}-{i}": i / 200})
"""


def test_two_processes_writing_the_eval_cache_keep_all_of_it(tmp_path):
    """demo --ray evaluates in several processes at once: none loses another's scores."""
    import subprocess
    import sys
    path = tmp_path / "eval-scores.db"
    writers = [subprocess.Popen([sys.executable, "-c", CACHE_WRITER, str(path), who], stderr=subprocess.PIPE,
                                text=True, cwd=tmp_path) for who in "ab"]
    assert [(w.wait(timeout=120), w.stderr.read()) for w in writers] == [(0, ""), (0, "")]
    keys = [f"{who}-{i}" for who in "ab" for i in range(200)]
    got = harness.ScoreCache(path).get(keys)
    assert got == {f"{who}-{i}": i / 200 for who in "ab" for i in range(200)}
