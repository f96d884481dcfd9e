"""`epdiff serve`: one persistent engine behind an OpenAI-style image API and a web page.

`api` maps the API's fields onto the engine's SamplingParams (whose `resolve` is the one
validation) and builds the answers and stream events, `service` keeps the engine's life (load,
watch, drain, close), `app` has the routes (a streamed request answers server-sent events) and the
Prometheus metrics, `server` runs it under uvicorn with the signal and exit handling.
The package itself imports none of them: every command's parser reads `serve.config`, and only
`serve` needs uvicorn.
"""
