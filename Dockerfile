# Root filesystem of wgmesh's managed Docker plugin: the static agent and
# nothing else. No base image: nothing is pulled. `make plugin` builds
# bin/wgmesh, builds this image, exports its filesystem, adds
# cmd/wgmesh/plugin.json as config.json and runs `docker plugin create`.
FROM scratch
COPY bin/wgmesh /wgmesh
ENTRYPOINT ["/wgmesh", "agent"]
