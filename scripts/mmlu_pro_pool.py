"""Build the replayed 8-model MMLU-Pro pool: python scripts/mmlu_pro_pool.py [DATA_DIR] [OUT_DIR]

A thin wrapper of ``coe pool DATA_DIR -o OUT_DIR`` (coe.apps.eval.pools.build_pool) with the shared
data's defaults; prints the summary as JSON."""

import json
import sys

from coe.apps.eval.pools import build_pool

data = sys.argv[1] if len(sys.argv) > 1 else "../shared/data/mmlu-pro-outputs"
out = sys.argv[2] if len(sys.argv) > 2 else "runs/mmlu-pro"
print(json.dumps(build_pool(data, out), indent=1))
