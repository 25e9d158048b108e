"""The pipeline's algorithms, installable and free of Dagster and Ray: one package per stage, in
the order data flows (``manifest`` → ``sharding`` → ``transformations`` → ``postgis`` →
``lake``), over a small foundation (``errors``, ``geoparquet``, ``wkb_layout``,
``object_store``, ``ledger``, ``descriptors``, ``memory``). A stage imports only earlier
stages and the foundation (tests/unit/test_house.py keeps it so)."""
