"""The only Ray glue of the code location: task submission (``submit``), the job's worker
processes (``workers``), the task bodies (``tasks``) and the application metrics
(``metrics``). ``import ray`` stays inside the functions that need it."""
