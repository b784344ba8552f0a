# HumanEval for a base (completion) model, run by llmc's `opencompass` step.
# An ordinary OpenCompass 0.5 config with one rule: the model entry has no `path` (nor
# `tokenizer_path`); llmc injects the folder of the model it just compressed.
# llmc also sets the workers (opencompass.max_num_workers), clamps run_cfg.num_gpus to the
# visible GPUs (0 on a CPU machine) for the local runner, and keeps trust_remote_code off unless
# the llmc config sets model.trust_remote_code: true; see docs/opencompass.md.
from mmengine.config import read_base

from opencompass.models import HuggingFaceBaseModel

with read_base():
    # completion prompt + the post-processor OpenCompass uses for base models
    from opencompass.configs.datasets.humaneval.internal_humaneval_gen_d2537e import humaneval_datasets

datasets = [*humaneval_datasets]

models = [
    dict(
        type=HuggingFaceBaseModel,
        abbr='llmc',
        max_out_len=512,
        batch_size=8,
        # stop at the end of the function: HumanEval completions are one function body
        stop_words=['\ndef ', '\nclass ', '\nif __name__', '\nprint(', '\n#'],
        run_cfg=dict(num_gpus=1),
    )
]
