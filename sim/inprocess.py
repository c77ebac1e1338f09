"""An in-process Flower Grid: the same ServerApp strategy and ClientApp, no Ray, no engine.

``sim.backend=inprocess`` runs a fleet by calling the ClientApp's handlers directly, one node
after another, in this process. It is the reference the Flower-on-Ray simulation is measured
against (benchmarks/): identical arithmetic and identical results, without the federation
machinery around it. It is also handy for debugging (breakpoints hit in the device code).
"""
from __future__ import annotations

from typing import Iterable

from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid

NODE_ID_OFFSET = 1000


class InProcessGrid(Grid):
    """A Grid whose nodes are ClientApp calls in this process, each with its own persistent Context.

    Args:
        client_app: the ClientApp every node runs. num_nodes: number of devices (partition ids
        0..num_nodes-1).
    """

    def __init__(self, client_app: ClientApp, num_nodes: int):
        from flwr.supercore.task_identity import TaskIdentity

        TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0
        self.client_app = client_app
        self.contexts = {
            NODE_ID_OFFSET + i: Context(run_id=1, node_id=NODE_ID_OFFSET + i,
                                        node_config={"partition-id": i, "num-partitions": num_nodes},
                                        state=RecordDict(), run_config={})
            for i in range(num_nodes)
        }
        self._run = None

    def set_run(self, run) -> None:  # type: ignore[override]
        self._run = run

    @property
    def run(self):  # type: ignore[override]
        return self._run

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str,
                       ttl: float | None = None) -> Message:
        return Message(content=content, dst_node_id=dst_node_id, message_type=message_type, group_id=group_id)

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
