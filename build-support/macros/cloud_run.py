# Pants BUILD-file macro (loaded through [GLOBAL].build_file_prelude_globs): what makes a folder under
# services/ a deployable Cloud Run service, and the list of those services, written once.

# The folders under services/ whose BUILD calls cloud_run_service (services/cli is a client, not one of them).
CLOUD_RUN_SERVICES = ("ping", "routeguide", "aggregator")


def each_service(address):
    """`address` for every Cloud Run service, with {name} its folder: each_service("services/{name}:lib")."""
    return [address.format(name=name) for name in CLOUD_RUN_SERVICES]


def cloud_run_service(name, **pex_kwargs):
    """The service's PEX (`./pants package services/NAME:NAME`), its image and its Cloud Run manifests.

    include_tools lets the image build turn the PEX into a venv, so a cold start runs no unpacking. The image
    is built from services/Dockerfile (the folder's Dockerfile links to it) with SERVICE=NAME, as
    build-support/engine/build_image.sh and Cloud Build build it. Cloud Build sets IMAGE_REGISTRY
    ($_REGION-docker.pkg.dev/$PROJECT_ID/$_REPOSITORY) and IMAGE_TAG ($SHORT_SHA); without them the image is
    the local NAME:dev. The image depends on the manifests, on the shared Dockerfile and on
    services/invokers.yaml (who may invoke and who can reach each service, rendered into the manifests), so
    `--changed-since` redeploys a service whose service*.yaml changed, and every service when the image recipe
    or the invokers file does.
    """
    pex_binary(name=name, entry_point="main.py", execution_mode="venv", include_tools=True, **pex_kwargs)
    docker_image(
        name="image",
        registries=[env("IMAGE_REGISTRY")] if env("IMAGE_REGISTRY") else [],
        repository=name,
        image_tags=[env("IMAGE_TAG", "dev")],
        extra_build_args=[f"SERVICE={name}"],
        # The PEX is named through ${SERVICE} in the Dockerfile's COPY, which inference cannot read.
        dependencies=[f":{name}", ":manifests", "//services:dockerfile", "//services:invokers"],
    )
    # Deploy inputs, read by tests/deploy (hadolint, manifest checks) and by build-support/deploy/render.py.
    files(name="manifests", sources=["service*.yaml"])
    files(name="dockerfile", sources=["Dockerfile"])
