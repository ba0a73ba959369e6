"""The data plane: READ jobs and range merging (`jobs`, pure), and the NIXL agent (`nixl`)."""
