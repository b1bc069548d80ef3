"""The job lifecycle, in one place: submit → (message) → claim → render → store → finish, and sweep.

* :mod:`.submit`: record the job and its batches (the job is accepted once they commit), then
  announce them through :mod:`farm.dispatch`; the broker being down never fails a submit.
* :mod:`.fetch`: a job's URL and hub inputs are fetched into storage, in a stage of their own,
  before its batches may be claimed (its data URIs went to storage at submit).
* :mod:`.claim`: a worker, woken by a message, claims batches in the ledger; each claim bumps
  the batch's fencing token.
* :mod:`.store`: the rendered images are uploaded and recorded in one fenced transaction per
  GPU batch; the last image of a job finishes it.
* :mod:`.finish`: the one way a job ends (completed, failed, cancelled), with its batches
  closed, its log line, its webhook, its Celery result and its waiters woken.
* :mod:`.sweep`: reaps expired leases and republishes queued batches whose message may be gone.
* :mod:`.announce`, :mod:`.retry`, :mod:`.pool`: the messages of queued batches; a failed attempt
  given back or its job failed; whether a model's pool has a live worker.

The package imports nothing itself: callers import the submodule they use
(``from farm.lifecycle import submit as submission``). It may import db/, models/ and the rest of
farm/ (never farm/api/ or tasks/).
"""
