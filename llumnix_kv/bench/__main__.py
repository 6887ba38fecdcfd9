"""python -m llumnix_kv.bench: the KV transfer bandwidth benchmark (llumnix-kv bench)."""

import sys

from llumnix_kv.bench.kv_bench import main

sys.exit(main())
