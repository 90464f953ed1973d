"""The node agent: one per host. Holds the controller link, caches runtimes and archives, applies the
preload policy, runs the broker that hands calls to miniworkers, and serves status endpoints."""
