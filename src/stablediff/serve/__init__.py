"""The serving side, with its own vocabulary: AUTOMATIC1111's HTTP API (server, sdapi, guards, worker) and
resumable batch jobs (batch, jobs). Optional extras; the models and sampling do not import it."""
