"""The orchestrator: the subnet's front door. Clients submit jobs with API keys; it routes them to
miners, stores results, audits a sample and scores miners.

How a request flows (`POST /v1/images`, four hops to its committed row):

1. `api.submit_image` validates the JSON or multipart form (`schemas.ImageRequest`) and calls
2. `service.Orchestrator.submit(secret, kind, body)` with the kind of its `task` ("inference" for
   text-to-image; `image_inputs.TASK_KINDS`), which looks the kind up in the registry (`kinds`)
   and hands one function to the store's writer thread (a kind whose payload fetches or decodes
   something, such as an input image, builds it on a worker thread first):
3. `store.Store.submit_job` admits the key (live, under its rate limit), builds the payload with
   the kind's `build_payload`, and inserts the row, in one transaction (`writer.Writer` commits it
   together with whatever else arrived meanwhile). A refusal comes back as an `errors` exception,
   which `api` turns into a 4xx.
4. After the commit the dispatcher is woken (`service.Orchestrator.requeued`); on PostgreSQL
   other replicas hear of it too (`store.Listener`).

Then `dispatch.Dispatcher` claims queued jobs and picks a miner for each (`routing`), sends the
kind's wire request, signed; the miner calls back (`callbacks.CallbackHandler`): the result is
checked by its kind (`results`; a LoRA in the model-code child process, `model_code`, so the
replica never imports torch), stored (`blobs`), and the job moves to `succeeded`; waiters, webhooks
(`webhooks`) and the audit queue (`auditing`, verdicts in `audit`; judged in the API replicas or
in a process of its own, `service.AuditsProcess`) are told after that commit.
`scoring` turns attempts and audits into per-miner scores for validators (`GET /v1/scores`).

Layout: `kinds` (job kinds as data; `image_inputs` reads the image tasks' input images),
`states` (the state machine the database enforces), `store` (every SQL statement) on `writer` and
`db`, `service` (the domain, no HTTP), `api` and `dashboard` (HTTP; `dashboard_access` keeps it to
the operator), `app` (the ASGI app), `serve` and `cli` (processes and commands).
"""
