"""The one place that knows etcd: keys, typed store, session (lease), election, mirrors."""
