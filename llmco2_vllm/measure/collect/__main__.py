"""``python -m llmco2_vllm.measure.collect``: the same command as ``llmco2 collect``."""

import sys

from llmco2_vllm.measure.collect.command_line import main

sys.exit(main())
