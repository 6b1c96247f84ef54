"""Pure layout for the console's pictures, drawn as inline SVG by the templates: the fork
tree (a tidy top-down tree, laid out with loops, no recursion) and an account's
balance-over-time chart. Plain data in, plain data (coordinates, labels) out."""
from __future__ import annotations

from dataclasses import dataclass, field
from datetime import date, datetime, timedelta

NODE_W, NODE_H = 200, 92
GAP_X, GAP_Y = 24, 56
MARGIN = 12


@dataclass
class Box:
    id: str
    x: float
    y: float
    depth: int
    status: str
    balance: int
    accounts: list
    parent_id: str | None
    children: list[str] = field(default_factory=list)


@dataclass
class TreeDrawing:
    boxes: list[Box]
    edges: list[tuple[float, float, float, float]]
    width: float
    height: float


def layout_tree(nodes: list, root_id: str) -> TreeDrawing:
    """`nodes` are `engine.reports.TreeNode`s (breadth first). Leaves take consecutive
    columns in depth-first order; a parent sits centred over its children."""
    by_id = {node.id: node for node in nodes}
    order: list[str] = []
    stack = [root_id] if root_id in by_id else []
    while stack:  # iterative depth-first preorder
        node_id = stack.pop()
        order.append(node_id)
        stack.extend(reversed([c for c in by_id[node_id].children if c in by_id]))
    column: dict[str, float] = {}
    next_leaf = 0
    for node_id in order:
        if not [c for c in by_id[node_id].children if c in by_id]:
            column[node_id] = next_leaf
            next_leaf += 1
    for node_id in reversed(order):  # children before parents
        kids = [column[c] for c in by_id[node_id].children if c in column]
        if kids:
            column[node_id] = (min(kids) + max(kids)) / 2
    top = by_id[root_id].depth if root_id in by_id else 0
    boxes = []
    for node_id in order:
        node = by_id[node_id]
        boxes.append(Box(id=node.id, x=MARGIN + column[node_id] * (NODE_W + GAP_X),
                         y=MARGIN + (node.depth - top) * (NODE_H + GAP_Y), depth=node.depth, status=node.status,
                         balance=node.balance, accounts=list(node.accounts), parent_id=node.parent_id,
                         children=list(node.children)))
    placed = {box.id: box for box in boxes}
    edges = [(placed[b.parent_id].x + NODE_W / 2, placed[b.parent_id].y + NODE_H, b.x + NODE_W / 2, b.y)
             for b in boxes if b.parent_id in placed]
    width = max((b.x for b in boxes), default=0) + NODE_W + MARGIN
    height = max((b.y for b in boxes), default=0) + NODE_H + MARGIN
    return TreeDrawing(boxes=boxes, edges=edges, width=width, height=height)


# The plot stretches to its box (the template positions the axis labels in HTML, as
# percentages of these coordinates, so text is never stretched with it).
CHART_W, CHART_H = 1000, 260
PAD_LEFT, PAD_RIGHT, PAD_TOP, PAD_BOTTOM = 0, 0, 10, 10


@dataclass
class Chart:
    points: str            # the polyline's "x,y x,y ..."
    area: str              # the same, closed along the bottom, for the fill
    y_ticks: list[tuple[float, int]]      # (percent from the top, value)
    x_labels: list[str]
    width: int = CHART_W
    height: int = CHART_H
    empty: bool = False


def nice_ceiling(value: int) -> int:
    """The next round number at or above `value` (1, 2, 2.5, 5 times a power of ten)."""
    if value <= 0:
        return 100
    magnitude = 1
    while magnitude * 10 <= value:
        magnitude *= 10
    for step in (1, 2, 2.5, 5, 10):
        if step * magnitude >= value:
            return int(step * magnitude)
    return 10 * magnitude


def chart_moment(effective_date: date, created_at: datetime) -> datetime:
    """Where an entry stands on the balance chart: on its effective date (a trade booked
    later for an earlier week lands in that week), at the time of day it was booked (so
    one day's entries keep their order). Effective dates never go back on an account, so
    the moments rise with the entries."""
    return datetime.combine(effective_date, created_at.timetz())


def balance_chart(history: list[tuple[datetime, int]]) -> Chart:
    """`history`: (time, balance after) oldest first. A step line: a balance holds until
    the next entry changes it."""
    if not history:
        return Chart(points="", area="", y_ticks=[], x_labels=[], empty=True)
    start, end = history[0][0], history[-1][0]
    span_s = max((end - start).total_seconds(), 1e-9)
    top = nice_ceiling(max(balance for _, balance in history))
    plot_w, plot_h = CHART_W - PAD_LEFT - PAD_RIGHT, CHART_H - PAD_TOP - PAD_BOTTOM

    def x_of(moment: datetime) -> float:
        if len(history) == 1:
            return PAD_LEFT + plot_w
        return PAD_LEFT + (moment - start).total_seconds() / span_s * plot_w

    def y_of(balance: int) -> float:
        return PAD_TOP + plot_h - balance / top * plot_h

    coordinates: list[tuple[float, float]] = []
    for index, (moment, balance) in enumerate(history):
        x, y = round(x_of(moment), 1), round(y_of(balance), 1)
        if index:
            coordinates.append((x, coordinates[-1][1]))
        coordinates.append((x, y))
    coordinates.append((PAD_LEFT + plot_w, coordinates[-1][1]))
    points = " ".join(f"{x},{y}" for x, y in coordinates)
    bottom = PAD_TOP + plot_h
    area = f"{coordinates[0][0]},{bottom} {points} {coordinates[-1][0]},{bottom}"
    ticks = [(round(y_of(top * i // 4) / CHART_H * 100, 2), top * i // 4) for i in range(5)]
    # Days for a history of weeks (with its middle), times for one of a day or two.
    days = end - start > timedelta(days=2)
    shown = (start, start + (end - start) / 2, end) if days else (start, end) if len(history) > 1 else (start,)
    labels = [moment.strftime("%d %b %Y" if days else "%d %b %Y %H:%M") for moment in shown]
    return Chart(points=points, area=area, y_ticks=ticks, x_labels=labels)
