# Build with: nix-build -E 'with import <nixpkgs> {}; callPackage ./package.nix {}'
# Needs nixpkgs 25.05 or newer (Rust >= 1.85, edition 2024).
{ lib, rustPlatform, nginx }:

rustPlatform.buildRustPackage (finalAttrs: {
  pname = "worker-gateway";
  version = "0.1.0";

  src = lib.fileset.toSource {
    root = ./.;
    fileset = lib.fileset.unions [
      ./Cargo.toml
      ./Cargo.lock
      ./rustfmt.toml
      ./src
      ./tests
      ./benches
      ./config
    ];
  };

  # Every crate is vendored from the lock file's checksums: no hash to bump.
  cargoLock.lockFile = ./Cargo.lock;

  # The tests bind 127.0.0.1 only (fine in the Linux sandbox) and run programs
  # from coreutils (tr, sleep, sh), which the build sandbox provides, and nginx (the
  # replicas test runs the shipped nginx example). The dashboard browser tests skip
  # themselves without Chromium (the sandbox has none).
  nativeCheckInputs = [ nginx ];
  __darwinAllowLocalNetworking = true;

  meta = {
    description = "One HTTP + WebSocket API over many worker runtimes, embedded and remote";
    license = lib.licenses.mit;
    mainProgram = "worker-gateway";
  };
})
