"""What the fleet is made of: devices and groups, credentials, bundles, blobs, desired state.

``devices`` (registry and groups), ``accounts`` (the service accounts' namespace),
``auth`` (operator tokens, device secrets), ``bundles`` (verified uploads and their
references), ``blobs`` (bundle files on disk), ``desired`` (what each device should run,
retained on the broker), ``capture_policy`` (a group's data capture, checked, and the one
each device's desired state carries), ``audit`` (the hash-chained audit log: verification
and export). Each is a service over the store; none of them judges drift or runs a rollout.
"""

__all__ = ["accounts", "audit", "auth", "blobs", "bundles", "capture_policy", "desired",
           "devices"]
