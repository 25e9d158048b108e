"""The local embedded dev stack: PostGIS, S3 (SeaweedFS), MongoDB wire protocol (SecantusDB),
a Ray head (+ optional worker nodes) and, on request, Dagster, all on 127.0.0.1, no Docker.

Run it from the repository root: ``.venv/bin/python -m devstack up|down|status|env|ray``.
Not installed and never in an image: tests and benchmarks import it from the repository root.
See docs/devstack.md for the layout, ports and why it is built this way.
"""
