"""An in-process Flower Grid: the same ServerApp strategy and ClientApp, no Ray, no engine.

``sim.backend=inprocess`` runs a fleet by calling the ClientApp's handlers directly, one node
after another, in this process. It is the reference the Flower-on-Ray simulation is measured
against (benchmarks/): identical arithmetic and identical results, without the federation
machinery around it. It is also handy for debugging (breakpoints hit in the device code).
"""
from __future__ import annotations

import time
from typing import Iterable

from flwr.app import DEFAULT_TTL, Context, Error, Message, Metadata, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

NODE_ID_OFFSET = 1000


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, each with its own persistent Context.

    Args:
        client_app: the ClientApp every node runs. num_nodes: number of devices (partition ids
        0..num_nodes-1).
    """

    RUN_ID = 1
    SERVER_NODE_ID = 0

    def __init__(self, client_app: ClientApp, num_nodes: int):
        self.client_app = client_app
        self.contexts = {
            NODE_ID_OFFSET + i: Context(run_id=self.RUN_ID, node_id=NODE_ID_OFFSET + i,
                                        node_config={"partition-id": i, "num-partitions": num_nodes},
                                        state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._run = None
        self._sent = 0

    def set_run(self, run) -> None:  # type: ignore[override]
        self._run = run

    @property
    def run(self):  # type: ignore[override]
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        """A message to node ``dst_node_id``, built from its metadata with Flower's public
        ``Message(content, metadata=Metadata(...))``. (``Message(content, dst_node_id, ...)`` reads the
        process-global ``flwr.supercore.task_identity.TaskIdentity``, a private module that only
        Flower's own runtimes set; there is no runtime here.)"""
        self._sent += 1
        metadata = Metadata(run_id=self.RUN_ID, message_id=f"inprocess-{self._sent}", src_node_id=self.SERVER_NODE_ID,
                            dst_node_id=dst_node_id, reply_to_message_id="", group_id=group_id,
                            created_at=time.time(), ttl=DEFAULT_TTL if ttl is None else ttl, message_type=message_type)
        return Message(content, metadata=metadata)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def _deliver(self, msg: Message) -> Message:
        try:
            return self.client_app(msg, self.contexts[msg.metadata.dst_node_id])
        except Exception as exc:  # as Flower does: the node's failure becomes an error reply
            return Message(Error(code=1, reason=f"{type(exc).__name__}: {exc}"), reply_to=msg)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        raise NotImplementedError("InProcessGrid delivers synchronously: use send_and_receive")

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return [self._deliver(m) for m in messages]
