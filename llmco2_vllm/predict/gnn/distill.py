"""Child process that distils the full GNN into its correction table for one deployment.

``python -m llmco2_vllm.predict.gnn.distill``: a ``Deployment`` as JSON on stdin, the table as
JSON on stdout (exit status 1 and the reason on stderr when the GNN cannot be built). The plugin
runs it so that torch and torch-geometric never load in vLLM's processes.
"""

from __future__ import annotations

import json
import math
import sys
import warnings

from llmco2_vllm.predict.deployment import Deployment


def main() -> int:
    import torch

    from llmco2_vllm.predict.gnn.model import GnnPredictor

    torch.set_num_threads(1)  # a short job beside a starting vLLM
    deployment = Deployment.from_json(sys.stdin.read())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        predictor = GnnPredictor(deployment.model, deployment.hardware, deployment.pipeline_parallel)
    if predictor.distilled is None or predictor.ensemble is None:
        print(predictor.fallback_reason or "the GNN could not be distilled", file=sys.stderr)
        return 1
    ensemble = predictor.ensemble
    quantiles = ensemble.unseen_residual_quantiles if predictor.unseen_hardware else ensemble.residual_quantiles
    table = predictor.distilled
    table.ratio_range = (math.exp(min(quantiles[0], 0.0)), math.exp(max(quantiles[1], 0.0)))
    json.dump(table.to_json(), sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
