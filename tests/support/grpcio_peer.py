"""A gRPC peer from grpcio (gRPC's C-core, not Ebb's Rust stack): an echo server, or a client that
calls it N times through a multi-address target and prints how many calls succeeded and failed.

    grpcio_peer.py server            -> prints the port it listens on, serves until killed
    grpcio_peer.py client TARGET N   -> prints "<ok> <failed> <last error>"

No generated code: the method takes and returns raw bytes.
"""
import sys
from concurrent import futures

import grpc

METHOD = "/echo.Echo/Say"


def serve():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    handler = grpc.method_handlers_generic_handler(
        "echo.Echo", {"Say": grpc.unary_unary_rpc_method_handler(lambda req, ctx: req)}
    )
    server.add_generic_rpc_handlers((handler,))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    print(port, flush=True)
    server.wait_for_termination()


def call(target, n):
    # round_robin: the client spreads calls over every address of the target, and names them all in
    # the channel's default authority.
    channel = grpc.insecure_channel(target, options=[("grpc.lb_policy_name", "round_robin")])
    say = channel.unary_unary(METHOD)
    ok, failed, last = 0, 0, "-"
    for i in range(n):
        message = b"call %d" % i
        try:
            if say(message, timeout=10) == message:
                ok += 1
            else:
                failed += 1
                last = "wrong-reply"
        except grpc.RpcError as e:
            failed += 1
            last = "%s:%s" % (e.code().name, (e.details() or "").replace(" ", "_"))
    print(ok, failed, last, flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "server":
        serve()
    else:
        call(sys.argv[2], int(sys.argv[3]))
