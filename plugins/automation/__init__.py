"""Automated intake: a real tracking server, the webhook receiver, the polling watcher and their queue.

- `server`: `mlflow server` on loopback with the settings loopback webhooks need;
- `webhook`: checking MLflow's signed deliveries and the receiver that queues gates;
- `queue`: the persistent gate queue (one live job per version, survives restarts);
- `workers`: each queued gate run as its own `trojan-gate gate` process;
- `watcher`: polling for versions without a verdict, for stores without webhooks.
"""
