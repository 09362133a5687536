"""EleutherAI's lm-evaluation-harness runs zoo models through zoo.interop.lm_eval: its scores equal
the model's own log-softmax sums, and local tasks (JSONL + task YAML, no download) run end to end."""
from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import zoo
from zoo.train.tokenizer import ByteTokenizer

lm_eval = pytest.importorskip("lm_eval", reason="needs the lm-eval extra: pip install 'hybridnorm-zoo[lm-eval]'")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from zoo.interop.lm_eval import ZooLM  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_intra_op_thread")

REPO = Path(__file__).resolve().parents[1]
SMALL = ["n_layers=1", "d_model=32", "n_heads=2", "ffn.hidden_size=64", "max_seq_len=32"]
EOS = ByteTokenizer.eos_id
MC_ROWS = [
    {"question": "def add(a, b):\n    return a", "choices": [" + b", " ]]] 7", "!!"], "label": 0},
    {"question": "import", "choices": [" os", " 123", " (((("], "label": 0},
    {"question": "for i in range(10):\n   ", "choices": [" print(i)", " ]"], "label": 0},
]
PPL_ROWS = [{"text": "def f(x):\n    return x * 2\n" * 3}, {"text": "print('é')\n"}]  # the first spans 3 windows
GEN_ROWS = [{"prompt": "x = 1\ny = ", "answer": "2"}, {"prompt": "def", "answer": " f"}]


@pytest.fixture(scope="module")
def model() -> zoo.ZooModel:
    torch.manual_seed(0)
    return zoo.build("tiny-dense-hybridnorm", SMALL).eval()


def logprobs(model: zoo.ZooModel, tokens: list[int]) -> torch.Tensor:
    with torch.no_grad():
        return F.log_softmax(model(torch.tensor([tokens])).logits[0].double(), dim=-1)


def hand_loglikelihood(model: zoo.ZooModel, context: str, continuation: str) -> tuple[float, bool]:
    """log p(continuation | context) summed over its bytes; an empty context is the separator, and
    trailing whitespace of the context belongs to the continuation (lm_eval's convention)."""
    stripped = context.rstrip()
    context, continuation = stripped, context[len(stripped):] + continuation
    ctx = list(context.encode()) or [EOS]
    cont = list(continuation.encode())
    whole = (ctx + cont)[-(model.cfg.max_seq_len + 1):]
    lp = logprobs(model, whole[:-1])[-len(cont):]
    target = torch.tensor(cont)
    return float(lp.gather(-1, target[:, None]).sum()), bool((lp.argmax(-1) == target).all())


def hand_rolling(model: zoo.ZooModel, text: str) -> float:
    """lm_eval's rolling scheme written out: windows of L predictions, the first from the separator,
    the last given a full window of context."""
    toks = list(text.encode())
    stream, n, L = [EOS, *toks], len(toks), model.cfg.max_seq_len
    total = 0.0
    for p in range(0, n, L):
        end = min(p + L, n)
        start = max(0, end - L)
        lp = logprobs(model, stream[start:end])[-(end - p):]
        total += float(lp.gather(-1, torch.tensor(stream[p + 1:end + 1])[:, None]).sum())
    return total


def hand_greedy(model: zoo.ZooModel, prompt: str, max_new: int, until: list[str]) -> str:
    """Greedy decoding without a cache: a full forward per token."""
    ids = list(prompt.encode()) or [EOS]
    new: list[int] = []
    for _ in range(max_new):
        token = int(logprobs(model, ids + new)[-1].argmax())
        if token == EOS:
            break
        new.append(token)
    text = ByteTokenizer().decode(new)
    for stop in until:
        text = text.split(stop, 1)[0] if stop else text
    return text


def instances(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_equals_the_models_log_softmax(model):
    lm = ZooLM(model=model, batch_size=2, device="cpu")
    pairs = [("def add(a, b):", " return a + b"), ("", "import os"), ("x" * 50, " = 1"), ("import", " sys"),
             ("# café", " au lait"), ("for i in range(3):\n   ", " pass")]
    got = lm.loglikelihood(instances("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (logprob, greedy) in zip(pairs, got):
        expected, expected_greedy = hand_loglikelihood(model, context, continuation)
        assert logprob == pytest.approx(expected, rel=1e-5, abs=1e-4), (context, continuation)
        assert greedy == expected_greedy


def test_loglikelihood_rolling_equals_the_models_log_softmax(model):
    lm = ZooLM(model=model, batch_size=3, device="cpu")
    texts = [row["text"] for row in PPL_ROWS] + ["a" * 32, "b"]
    assert len(texts[0].encode()) > 2 * model.cfg.max_seq_len
    got = lm.loglikelihood_rolling(instances("loglikelihood_rolling", [(t,) for t in texts]), disable_tqdm=True)
    for text, value in zip(texts, got):
        assert value == pytest.approx(hand_rolling(model, text), rel=1e-5, abs=1e-4), text[:20]


def test_generate_until_is_greedy_with_left_padding_and_stops(model):
    prompts = ["def f(x):\n    return", "import", "x"]
    plain = hand_greedy(model, prompts[0], 8, [])
    stop = plain[2] if len(plain) > 2 else "\n"
    kwargs = [{"until": [], "max_gen_toks": 8}, {"until": [], "max_gen_toks": 8}, {"until": [], "max_gen_toks": 8},
              {"until": [stop], "max_gen_toks": 8}]
    reqs = instances("generate_until", [(p, k) for p, k in zip([*prompts, prompts[0]], kwargs)])
    batched = ZooLM(model=model, batch_size=4, device="cpu").generate_until(reqs, disable_tqdm=True)
    alone = ZooLM(model=model, batch_size=1, device="cpu").generate_until(reqs, disable_tqdm=True)
    assert batched == alone, "a left-padded batch must give each prompt's own continuation"
    assert batched[:3] == [hand_greedy(model, p, 8, []) for p in prompts]
    assert batched[3] == hand_greedy(model, prompts[0], 8, [stop]) and stop not in batched[3]


def test_model_args_are_checked():
    with pytest.raises(zoo.ZooError, match="exactly one"):
        ZooLM.create_from_arg_string("", {"device": "cpu"})
    with pytest.raises(zoo.ZooError, match="unknown zoo model_args"):
        ZooLM.create_from_arg_string("name=tiny-dense-hybridnorm,temprature=1", {"device": "cpu"})
    with pytest.raises(zoo.ZooError, match="max_length must lie in 2..256"):
        ZooLM.create_from_arg_string("name=tiny-dense-hybridnorm,max_length=999")
    lm = ZooLM.create_from_arg_string("name=tiny-dense-hybridnorm,batch_size=4,max_length=64",
                                      {"batch_size": 1, "device": "cuda:0", "max_batch_size": None})
    assert (lm.batch_size, lm.max_length, lm.eot_token_id) == (4, 64, 0), "model_args win over the CLI's defaults"
    assert lm.device.type == ("cuda" if torch.cuda.is_available() else "cpu")


def write_tasks(folder: Path) -> Path:
    """Three local tasks over JSONL files: multiple choice, perplexity, and generation."""
    folder.mkdir(parents=True, exist_ok=True)
    cache = folder / "hf-datasets-cache"
    for name, rows in {"mc": MC_ROWS, "ppl": PPL_ROWS, "gen": GEN_ROWS}.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    common = f"""
        dataset_path: json
        dataset_kwargs:
          data_files:
            test: {{data}}
          cache_dir: {cache}
        test_split: test
    """
    tasks = {
        "zoo_test_mc": """
            output_type: multiple_choice
            doc_to_text: "{{question}}"
            doc_to_choice: "{{choices}}"
            doc_to_target: label
            target_delimiter: ""
            metric_list:
              - metric: acc
        """,
        "zoo_test_ppl": """
            output_type: loglikelihood_rolling
            doc_to_text: ""
            doc_to_target: "{{text}}"
            metric_list:
              - metric: word_perplexity
              - metric: byte_perplexity
              - metric: bits_per_byte
        """,
        "zoo_test_gen": """
            output_type: generate_until
            doc_to_text: "{{prompt}}"
            doc_to_target: "{{answer}}"
            generation_kwargs:
              until: ["\\n"]
              max_gen_toks: 6
            metric_list:
              - metric: exact_match
        """,
    }
    for task, body in tasks.items():
        data = folder / f"{task.rsplit('_', 1)[1]}.jsonl"
        text = f"task: {task}\n" + textwrap.dedent(common).format(data=data) + textwrap.dedent(body)
        (folder / f"{task}.yaml").write_text(text)
    return folder


def test_local_tasks_run_end_to_end(model, tmp_path):
    tasks = write_tasks(tmp_path / "tasks")
    out = lm_eval.simple_evaluate(model=ZooLM(model=model, batch_size=4, device="cpu"),
                                  tasks=["zoo_test_mc", "zoo_test_ppl", "zoo_test_gen"],
                                  task_manager=TaskManager(include_path=str(tasks), include_defaults=False),
                                  log_samples=True)
    results = out["results"]
    assert set(results) == {"zoo_test_mc", "zoo_test_ppl", "zoo_test_gen"}
    for doc in out["samples"]["zoo_test_mc"]:
        row = MC_ROWS[doc["doc_id"]]
        scores = [resp[0][0] for resp in doc["resps"]]
        expected = [hand_loglikelihood(model, row["question"], c)[0] for c in row["choices"]]
        assert scores == pytest.approx(expected, rel=1e-5, abs=1e-4)
        assert doc["acc"] == float(max(range(len(scores)), key=scores.__getitem__) == row["label"])
    rolling = {doc["doc_id"]: doc["resps"][0][0] for doc in out["samples"]["zoo_test_ppl"]}
    assert rolling == {i: pytest.approx(hand_rolling(model, r["text"]), rel=1e-5, abs=1e-4) for i, r in enumerate(PPL_ROWS)}
    total_bytes = sum(len(r["text"].encode()) for r in PPL_ROWS)
    expected_bpb = -sum(rolling.values()) / total_bytes / torch.log(torch.tensor(2.0)).item()
    assert results["zoo_test_ppl"]["bits_per_byte,none"] == pytest.approx(expected_bpb, rel=1e-5)
    for doc in out["samples"]["zoo_test_gen"]:
        assert doc["resps"][0][0] == hand_greedy(model, GEN_ROWS[doc["doc_id"]]["prompt"], 6, ["\n"])


@pytest.mark.slow  # about 35 s on a busy 2-core machine: lm_eval's CLI indexes its thousands of built-in tasks
def test_documented_command_runs(tmp_path, subprocess_env):
    """`python -m zoo.interop.lm_eval --model zoo --model_args name=...` is lm_eval's CLI with zoo registered."""
    tasks = write_tasks(tmp_path / "tasks")
    cmd = [sys.executable, "-m", "zoo.interop.lm_eval", "--model", "zoo", "--model_args",
           "name=tiny-dense-hybridnorm,batch_size=4", "--tasks", "zoo_test_mc,zoo_test_ppl", "--include_path", str(tasks),
           "--device", "cpu", "--output_path", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=subprocess_env(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1"), cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "zoo_test_mc" in proc.stdout and "bits_per_byte" in proc.stdout
    (results,) = (tmp_path / "out").rglob("results_*.json")
    data = json.loads(results.read_text())
    assert data["config"]["model"] == "zoo" and data["config"]["model_name"] == "tiny-dense-hybridnorm"
    assert set(data["results"]) == {"zoo_test_mc", "zoo_test_ppl"}
