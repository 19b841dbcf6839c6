"""What every service shares: serving, calling other services, identity, tracing, metrics, logs, settings.

A call coming in, module by module, in order:
  serving        the process: settings (settings), logs (logs), tracing and metrics providers, the server on
                 $PORT with health and reflection, the drain on SIGTERM; N copies on one port (workers); the
                 server is the model the servicers are written for: grpc.aio, or grpc.server's threads
                 (handler_kinds.Threads: what a thread awaits runs on the process's event loop)
  server_chain   one wrapper per method, made when a service is added; in each call, outermost first:
    metrics        the call's duration and messages (none for probes: probes.PROBE_SERVICES)
    deadlines      the incoming deadline, kept in a ContextVar for the calls made downstream
    identity       the caller's ID token checked against the issuer's keys (issuer_keys); Check is exempt
    server_spans   the SERVER span, child of the caller's trace context (propagation), once the caller is
                   admitted (a refused call has none; a new token's span is dated from the call's entry)
  handlers       the wrapper of each of the four handler kinds, per model (aio_handlers, thread_handlers; what
                 they share: handler_kinds): unary requests read after identity, requests that do not parse
                 refused with INVALID_ARGUMENT; then the servicer's method

A call going out, in order:
  channels       one channel per downstream, made once: TLS, keepalive, retries of idempotent methods
  client_chain   on each call: the timeout capped by the incoming deadline (deadlines), the ID token for the
                 callee's audience (tokens), the CLIENT span and trace headers (client_spans), the duration
                 (metrics)
  downstream     what the caller is told when that call fails
"""
