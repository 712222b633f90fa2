.PHONY: test run stop lint
test:  ## set up .venv and run every test (lint first)
	./scripts/test
run:   ## set up .venv and start the local stack (backjobs stack up)
	./scripts/run
stop:  ## stop the local stack (backjobs stack down)
	./scripts/stop
lint:  ## ruff check, ruff format --check, mypy strict (src, flows, tasks)
	bash -c "source scripts/_venv.sh && .venv/bin/ruff check . && .venv/bin/ruff format --check . && .venv/bin/mypy"
