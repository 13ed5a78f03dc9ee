"""A small driving world on Render3D: a road with lane markings, box obstacles, a traffic light, an expert and a
kinematic closed-loop simulator (the LeTFuser demo world, paper 38).

World frame: z up, metres; the road starts at x = 0 and runs along +x, its centreline ``y = curvature x^2 / 2``
(straight or a gentle curve). A :class:`DrivingWorld` holds the road (segments of textured planes, edge lines, a
centre line and a stop line), 0-3 Fashion-MNIST boxes standing on the road (each on one side of the centreline), and a
signal bar over the road (a box: red or green for the whole episode) with its stop line 1.5 m before it. The ego car
(2 m x 1 m, reference point at its centre, state ``(x, y, heading, speed)``) carries a rig of cameras 1.5 m high:
left / front / right, yaw +60 / 0 / -60 degrees (left is +y), 5 degrees pitch down, 75 degrees field of view, square
images (:func:`rig_cameras`). :func:`render_ego_views` ray-casts them with :func:`.render3d.render` and labels every
pixel with one of :data:`CLASSES` from the object ids.

The expert (:func:`expert_waypoints`) plans ``NUM_WAYPOINTS`` future positions 0.5 s apart in the ego frame (x
forward, y left): lane keeping on the centreline, a smooth swerve to the free side around each obstacle, and a braking
profile that plans to stop the car's front 1.5 m before the stop line when the light is red (about 1 m in closed
loop); a lateral offset from that path
decays with a 0.7 s time constant. :class:`PIDController` turns waypoints into acceleration and steering (as
TransFuser/LeTFuser do: the heading to an aim point and the speed implied by the first waypoint, each through a PID),
:func:`bicycle_step` moves the car, and :func:`rollout` closes the loop (policy -> waypoints -> PID -> bicycle step ->
re-render), counting collisions (car footprint vs obstacle boxes) and red-light violations (the car's front past the
stop line while red). The cached sets are in :mod:`.driving_sets`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from ...layers.camera import Cameras, intrinsics_from_fov, look_at
from .render3d import Box, Plane, Scene, item_texture, render

__all__ = [
    "CLASSES",
    "DT",
    "NUM_WAYPOINTS",
    "WAYPOINT_DT",
    "DrivingWorld",
    "PIDController",
    "bicycle_step",
    "expert_waypoints",
    "measurements",
    "render_ego_views",
    "rig_cameras",
    "rollout",
    "sample_world",
]

CLASSES = ("background", "road", "lane", "obstacle", "light_red", "light_green")
NUM_WAYPOINTS = 4
WAYPOINT_DT = 0.5  # s between waypoints
DT = 0.25  # s per simulator step
HALF_LENGTH, HALF_WIDTH, WHEELBASE = 1.0, 0.5, 2.0  # the ego car (m)
ROAD_HALF, SWERVE, STOP_MARGIN = 3.0, 1.5, 1.5  # road half-width, swerve offset, front-to-stop-line margin at a stop
CAMERA_YAWS = (60.0, 0.0, -60.0)  # left, front, right (degrees; left looks to +y)
MEASUREMENT_DIM = 6  # speed / 5, command one-hot (left, straight, right), route target point / 20 (x, y)
_LENGTH, _SEG = 60.0, 5.0  # road length and segment length (m)


@dataclass
class DrivingWorld:
    """One episode's world: the road's ``curvature``, obstacles ``(x, side, lateral, hx, hy, hz, yaw)`` rows, the
    light's ``light_x`` and state (``red``), the expert's cruise ``speed`` and the Render3D ``scene``."""

    curvature: float
    obstacles: np.ndarray  # (k, 7)
    light_x: float
    red: bool
    speed: float
    scene: Scene
    classes: torch.Tensor  # int64 (1 + primitives,): the CLASSES index of object id 0 (sky) and of each primitive

    @property
    def stop_x(self) -> float:
        return self.light_x - 1.5

    def centre_y(self, x: np.ndarray | float) -> np.ndarray | float:
        return 0.5 * self.curvature * np.square(x)

    def heading(self, x: np.ndarray | float) -> np.ndarray | float:
        return np.arctan(self.curvature * np.asarray(x))

    def path_y(self, x: np.ndarray | float) -> np.ndarray:
        """The expert's lateral target: the centreline plus a raised-cosine swerve around each obstacle."""
        x = np.asarray(x, dtype=np.float64)
        y = np.asarray(self.centre_y(x), dtype=np.float64).copy()
        for ox, side, _, hx, *_ in self.obstacles:
            dist = np.abs(x - ox) - (hx + 2.0)  # full swerve from 2 m before to 2 m after the box
            ramp = np.clip(dist / 7.0, 0, 1)  # then back to the lane over 7 m
            y += -side * SWERVE * 0.5 * (1 + np.cos(np.pi * ramp))
        return y

    def target_speed(self, x: np.ndarray | float) -> np.ndarray:
        """Cruise speed, or a 1.5 m/s^2 braking profile to a stop before the stop line when red."""
        x = np.asarray(x, dtype=np.float64)
        if not self.red:
            return np.full_like(x, self.speed)
        room = np.clip(self.stop_x - STOP_MARGIN - HALF_LENGTH - x, 0, None)
        return np.minimum(self.speed, np.sqrt(2 * 1.5 * room))


def _solid(colour: tuple[float, float, float], rng: np.random.Generator | None = None, jitter: float = 0.0):
    tex = torch.tensor(colour, dtype=torch.float32)[:, None, None].expand(3, 28, 28).clone()
    if rng is not None and jitter:
        tex += torch.from_numpy(rng.uniform(-jitter, jitter, (1, 28, 28))).float()
    return tex.clamp(0, 1)


def sample_world(rng: np.random.Generator, pool: torch.Tensor, max_obstacles: int = 3) -> DrivingWorld:
    """A random world: straight or gently curved road, 0..``max_obstacles`` boxes textured with ``pool`` items."""
    curvature = float(rng.choice([0.0, 1.0, -1.0]) * rng.uniform(0.004, 0.012))
    light_x, red, speed = float(rng.uniform(18, 30)), bool(rng.random() < 0.5), float(rng.uniform(3.0, 5.0))
    k = int(rng.integers(0, max_obstacles + 1))
    slots = rng.permutation(3)[:k]  # obstacle slots 20 m apart: swerves never overlap
    rows = []
    for j in sorted(slots):
        hx, hy, hz, yaw = *rng.uniform([0.4, 0.35, 0.4], [0.7, 0.6, 0.9]), rng.uniform(-0.3, 0.3)
        reach = abs(hx * math.sin(yaw)) + abs(hy * math.cos(yaw))  # lateral half-extent of the turned box
        side = float(rng.choice([-1.0, 1.0]))
        rows.append([10 + 20 * j + rng.uniform(0, 2), side, reach + rng.uniform(0.2, 0.6), hx, hy, hz, yaw])
    obstacles = np.array(rows, dtype=np.float64).reshape(-1, 7)
    red_tex = (0.9, 0.12, 0.1) if red else (0.1, 0.85, 0.2)
    textures = [_solid((0.25, 0.5, 0.2), rng, 0.12), _solid((0.32, 0.32, 0.34), rng, 0.06), _solid((0.95,) * 3),
                _solid(red_tex)]  # fmt: skip
    prims: list[Plane | Box] = [Plane((25.0, 0.0, -0.02), (60.0, 0.0, 0.0), (0.0, 60.0, 0.0), 0, tile=8.0)]
    cls = [0]
    # the world's road geometry places the primitives; its scene and class table are filled in below
    world = DrivingWorld(curvature, obstacles, light_x, red, speed, Scene(prims, torch.stack(textures)), torch.zeros(1))
    for x0 in np.arange(-10.0, _LENGTH, _SEG):  # road chords, with edge lines and a centre line on top
        x1 = x0 + _SEG
        a = np.array([x0, world.centre_y(x0)])
        b = np.array([x1, world.centre_y(x1)])
        mid, half = (a + b) / 2, (b - a) / 2
        normal = np.array([-half[1], half[0]]) / np.linalg.norm(half)
        for offset, width, z, tex, c in ((0.0, ROAD_HALF, 0.0, 1, 1), (ROAD_HALF - 0.15, 0.1, 0.01, 2, 2),
                                         (-ROAD_HALF + 0.15, 0.1, 0.01, 2, 2), (0.0, 0.06, 0.01, 2, 2)):  # fmt: skip
            centre = mid + normal * offset
            prims.append(Plane((*map(float, centre), z), (*map(float, half), 0.0), (*map(float, normal * width), 0.0),
                               tex))  # fmt: skip
            cls.append(c)
    heading = float(world.heading(world.stop_x))
    across = (-math.sin(heading) * ROAD_HALF, math.cos(heading) * ROAD_HALF, 0.0)
    along = (math.cos(heading) * 0.2, math.sin(heading) * 0.2, 0.0)
    prims.append(Plane((world.stop_x, float(world.centre_y(world.stop_x)), 0.012), along, across, 2))
    cls.append(2)
    light_heading = float(world.heading(light_x))
    prims.append(Box((light_x, float(world.centre_y(light_x)), 2.6), (0.25, ROAD_HALF + 0.5, 0.35), 3,
                     (0.0, 0.0, light_heading)))  # fmt: skip
    cls.append(4 if red else 5)
    items = rng.integers(0, len(pool), len(obstacles))
    for (ox, side, lat, hx, hy, hz, yaw), item in zip(obstacles, items, strict=True):
        textures.append(item_texture(rng, pool[item]))
        oy = float(world.centre_y(ox)) + side * lat
        prims.append(Box((float(ox), oy, float(hz)), (float(hx), float(hy), float(hz)), len(textures) - 1,
                         (0.0, 0.0, float(world.heading(ox) + yaw))))  # fmt: skip
        cls.append(3)
    world.scene = Scene(prims, torch.stack(textures))
    world.classes = torch.tensor([0, *cls], dtype=torch.long)  # object id 0 is the sky
    return world


def rig_cameras(size: int, cameras: str = "three") -> tuple[torch.Tensor, torch.Tensor]:
    """The ego camera rig: ``K`` (V, 3, 3) and ``cam_to_ego`` (V, 4, 4) of ``size`` px square views (V = 3 for
    ``"three"``: left, front, right; 1 for ``"front"``)."""
    if cameras not in ("three", "front"):
        raise ValueError(f"cameras={cameras!r}; expected 'three' or 'front'")
    yaws = np.radians(CAMERA_YAWS if cameras == "three" else (0.0,))
    pitch = math.radians(5.0)
    eye = torch.tensor([[0.5, 0.0, 1.5]] * len(yaws), dtype=torch.float32)
    look = torch.tensor([[math.cos(y) * math.cos(pitch), math.sin(y) * math.cos(pitch), -math.sin(pitch)]
                         for y in yaws], dtype=torch.float32)  # fmt: skip
    K = intrinsics_from_fov(torch.full((len(yaws),), math.radians(75.0)), size, size)
    return K, look_at(eye, eye + look)


def ego_pose(state: np.ndarray) -> torch.Tensor:
    """``ego_to_world`` (4, 4) of state ``(x, y, heading, speed)``."""
    x, y, psi = (float(v) for v in state[:3])
    pose = torch.eye(4)
    pose[:2, :2] = torch.tensor([[math.cos(psi), -math.sin(psi)], [math.sin(psi), math.cos(psi)]])
    pose[0, 3], pose[1, 3] = x, y
    return pose


def render_ego_views(world: DrivingWorld, state: np.ndarray, size: int, cameras: str = "three") -> dict:
    """``views`` uint8 (V, 3, S, S), ``depth`` (V, S, S) z-depth (0: sky), ``semantic`` int64 (V, S, S) CLASSES
    indices, ``K`` (V, 3, 3) and ``cam_to_ego`` (V, 4, 4) of the ego rig at ``state``."""
    K, cam_to_ego = rig_cameras(size, cameras)
    out = render(world.scene, Cameras(K, ego_pose(state) @ cam_to_ego, (size, size)))
    return {"views": out["rgb"], "depth": out["depth"], "semantic": world.classes[out["object_id"]], "K": K,
            "cam_to_ego": cam_to_ego}  # fmt: skip


def to_ego(state: np.ndarray, points: np.ndarray) -> np.ndarray:
    """World points (..., 2) in the ego frame of ``state`` (x forward, y left)."""
    c, s = math.cos(state[2]), math.sin(state[2])
    d = points - np.asarray(state[:2])
    return np.stack([c * d[..., 0] + s * d[..., 1], -s * d[..., 0] + c * d[..., 1]], -1)


def expert_waypoints(world: DrivingWorld, state: np.ndarray) -> np.ndarray:
    """The expert's ``NUM_WAYPOINTS`` future positions (K, 2) in the ego frame, ``WAYPOINT_DT`` s apart."""
    x, y, _, v = (float(s) for s in state)
    error = y - float(world.path_y(x))
    pts, xk, vk = [], x, v
    for k in range(1, NUM_WAYPOINTS + 1):
        vk = max(0.0, min(float(world.target_speed(xk)), vk + 1.5 * WAYPOINT_DT))
        xk += vk * WAYPOINT_DT * math.cos(float(world.heading(xk)))
        pts.append([xk, float(world.path_y(xk)) + error * math.exp(-k * WAYPOINT_DT / 0.7)])
    return to_ego(state, np.array(pts))


def measurements(world: DrivingWorld, state: np.ndarray) -> np.ndarray:
    """The ego measurement vector (MEASUREMENT_DIM,): speed / 5, the command one-hot (the road bends left, goes
    straight, bends right) and the route target (the centreline 15 m ahead, ego frame) / 20."""
    cmd = np.zeros(3)
    cmd[1 if abs(world.curvature) < 1e-6 else (0 if world.curvature > 0 else 2)] = 1
    ahead = state[0] + 15.0
    target = to_ego(state, np.array([ahead, float(world.centre_y(ahead))])) / 20
    return np.concatenate([[state[3] / 5], cmd, target]).astype(np.float32)


class PIDController:
    """A PID with an integral window (TransFuser-style): ``step(error) -> kp e + ki mean(window) + kd (e - e_prev)``."""

    def __init__(self, kp: float, ki: float = 0.0, kd: float = 0.0, window: int = 10) -> None:
        self.kp, self.ki, self.kd, self.window = kp, ki, kd, window
        self.errors: list[float] = []

    def step(self, error: float) -> float:
        self.errors = [*self.errors, error][-self.window :]
        derivative = self.errors[-1] - self.errors[-2] if len(self.errors) > 1 else 0.0
        return self.kp * error + self.ki * float(np.mean(self.errors)) + self.kd * derivative


def control(waypoints: np.ndarray, speed: float, turn: PIDController, longitudinal: PIDController):
    """Waypoints (K, 2) ego frame -> (acceleration m/s^2, steering rad): the speed the first waypoint implies, and
    the heading to the aim point (the second waypoint, or the first when that is within 1.5 m)."""
    desired = float(np.linalg.norm(waypoints[0])) / WAYPOINT_DT
    if desired < 0.3:  # the plan says stop: brake to a standstill
        return -4.0, 0.0
    accel = float(np.clip(longitudinal.step(desired - speed), -4.0, 2.0))
    aim = waypoints[1] if np.linalg.norm(waypoints[1]) > 1.5 else waypoints[0]
    angle = math.atan2(aim[1], max(aim[0], 1e-3))
    return accel, float(np.clip(turn.step(angle), -0.6, 0.6))


def bicycle_step(state: np.ndarray, accel: float, steer: float, dt: float = DT) -> np.ndarray:
    """One kinematic bicycle step (rear-axle-free form: heading rate v tan(steer) / wheelbase)."""
    x, y, psi, v = state
    return np.array([x + v * math.cos(psi) * dt, y + v * math.sin(psi) * dt,
                     psi + v / WHEELBASE * math.tan(steer) * dt, max(0.0, v + accel * dt)])  # fmt: skip


def collides(world: DrivingWorld, state: np.ndarray) -> bool:
    """The car's footprint (three circles of radius 0.55 m along it) touches an obstacle box."""
    c, s = math.cos(state[2]), math.sin(state[2])
    centres = np.array([[state[0] + t * c, state[1] + t * s] for t in (-0.5, 0.0, 0.5)])
    for ox, side, lat, hx, hy, _, yaw in world.obstacles:
        oy = float(world.centre_y(ox)) + side * lat
        a = float(world.heading(ox)) + yaw
        d = centres - [ox, oy]
        local = np.stack(
            [math.cos(a) * d[:, 0] + math.sin(a) * d[:, 1], -math.sin(a) * d[:, 0] + math.cos(a) * d[:, 1]], -1
        )
        gap = np.linalg.norm(np.clip(np.abs(local) - [hx, hy], 0, None), axis=-1)
        if (gap < 0.55).any():
            return True
    return False


def start_state(world: DrivingWorld, rng: np.random.Generator) -> np.ndarray:
    """An episode's start: near the lane centre at x = 0, roughly along the road, below cruise speed."""
    return np.array([0.0, rng.uniform(-0.3, 0.3), rng.uniform(-0.05, 0.05), rng.uniform(0.0, world.speed)])


Policy = Callable[[dict, np.ndarray], np.ndarray]


def rollout(world: DrivingWorld, policy: Policy | None, state: np.ndarray, steps: int = 36, size: int = 32,
            cameras: str = "three", render: bool = True) -> dict:  # fmt: skip
    """Drive ``steps`` steps of ``DT`` s: ``policy(observation, state) -> waypoints (K, 2)`` (None: the expert,
    which needs no rendering). The observation is :func:`render_ego_views` plus ``measurements`` (``render=False``:
    the measurements alone, for policies that do not look). Returns the
    states (steps + 1, 4), ``collision`` and ``red_violation`` (bool) and the distance driven along x."""
    turn, longitudinal = PIDController(1.0, 0.1, 0.3), PIDController(3.0, 0.2, 0.5)
    states, hit, violation = [state], False, False
    for _ in range(steps):
        if policy is None:
            wps = expert_waypoints(world, state)
        else:
            obs = render_ego_views(world, state, size, cameras) if render else {}
            obs["measurements"] = measurements(world, state)
            wps = np.asarray(policy(obs, state), dtype=np.float64)
        state = bicycle_step(state, *control(wps, float(state[3]), turn, longitudinal))
        states.append(state)
        hit |= collides(world, state)
        violation |= world.red and state[0] + HALF_LENGTH > world.stop_x
    return {"states": np.stack(states), "collision": hit, "red_violation": violation,
            "progress": float(states[-1][0] - states[0][0])}  # fmt: skip
