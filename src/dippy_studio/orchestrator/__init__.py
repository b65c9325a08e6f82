"""The orchestrator: the subnet's front door. Clients submit jobs with API keys; it routes them to
miners, stores results, audits a sample and scores miners. State lives in SQL (see `store`)."""
