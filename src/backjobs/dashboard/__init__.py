"""The admin-only gate over Prefect's server and UI: who may call what (:mod:`.gate`), the
tokens and sign-in links (:mod:`.tokens`), its own pages (:mod:`.pages`), and serving it
(:mod:`.server`). It runs alone in production, so it imports nothing of the local stack."""
