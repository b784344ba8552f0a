"""Code that runs with OpenCompass's Python, never imported by llmc at run time.

The folder goes on ``PYTHONPATH`` of the OpenCompass subprocess, so its modules are imported by
top-level name (``llmc_oc_driver``, ``llmc_oc_compat``, ``llmc_oc_weights``) and import nothing
from llmc: OpenCompass may live in another environment (``opencompass.python``).
"""
