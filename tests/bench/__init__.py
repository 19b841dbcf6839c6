import os

# The harness forks server and load processes while its own gRPC channels run. gRPC's fork handlers are for
# children that keep using gRPC; these exec at once, and the handlers only log or break them.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
