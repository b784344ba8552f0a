# HumanEval for a chat (instruction-tuned) model, run by llmc's `opencompass` step.
# An ordinary OpenCompass 0.5 config with one rule: the model entry has no `path` (nor
# `tokenizer_path`); llmc injects the folder of the model it just compressed. The model's chat
# template comes from that folder's tokenizer; its end-of-turn token stops generation.
# llmc also sets the workers (opencompass.max_num_workers), clamps run_cfg.num_gpus to the
# visible GPUs (0 on a CPU machine) for the local runner, and keeps trust_remote_code off unless
# the llmc config sets model.trust_remote_code: true; see docs/opencompass.md.
from mmengine.config import read_base

from opencompass.models import HuggingFacewithChatTemplate

with read_base():
    # OpenAI's "simple-evals" instruction prompt; the answer's first code block is scored
    from opencompass.configs.datasets.humaneval.humaneval_gen import humaneval_datasets

datasets = [*humaneval_datasets]

models = [
    dict(
        type=HuggingFacewithChatTemplate,
        abbr='llmc',
        max_out_len=512,
        batch_size=8,
        run_cfg=dict(num_gpus=1),
    )
]
