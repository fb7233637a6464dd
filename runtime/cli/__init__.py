"""cocoon.runtime.cli: the ``cocoon`` command.

``main`` holds the global flags, the dispatch and the one error report (a line on stderr, a
runc-style JSON line in ``--log``, exit status 1); ``oci`` runc's verbs and their grammar;
``tools`` cocoon's own verbs (check, env, image, sandbox, demo). Each verb is a short function
over ``container`` (or ``sandbox``); heavy modules load inside the verbs that need them, so
``--version``, ``state`` and ``list`` import no sandbox code and no image builder; no verb
imports grpc or protobuf (sandbox.client speaks JSON to the monitor).

May import: the standard library, cocoon.runtime.* (but never cocoon.runtime.monitor).
"""
