"""LiteRT in worker processes: a pool of child processes that run a model's flatbuffer,
each with its own interpreter and GIL, supervised from the server's event loop.

* `pool`: `WorkerPool`, the pool the server calls (`run` on the event loop, blocking
  `__call__` before `serve`), hands each batch to an idle worker and supervises them
  (hang timeouts, heartbeats, restarts with back-off, health, `close`/`wait_closed`);
* `worker`: `Worker`, one child process seen from the server (spawn, socket, shared
  region, blocking and event-loop calls, kill, reap), and `WorkerError`;
* `wire`: the frames the server and a worker exchange, the memory they share per
  worker (`Region`), and the checks on a batch and on its answer;
* `child`: the worker process itself (``python -m convserve.server.workers.child``),
  which loads the model and answers batches and heartbeats.
"""
