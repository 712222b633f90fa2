"""The local stack (``backjobs stack up | down | status | env``): its configuration and
secrets (:mod:`.config`), its detached processes (:mod:`.processes`), its calls to the
Prefect server (:mod:`.api`), up / down / status (:mod:`.lifecycle`), and the demo data."""
