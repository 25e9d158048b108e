"""``python -m libs.manifest``: print the manifest's JSON Schema (to regenerate the published one)."""

import json
import sys

from libs.manifest.schema import manifest_json_schema

sys.stdout.write(json.dumps(manifest_json_schema(), indent=2, sort_keys=True) + "\n")
