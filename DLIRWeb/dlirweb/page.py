"""The registration page: trame state and widgets wired to a :class:`~dlirweb.session.Session`.

The left drawer holds the inputs (sample pair, file choosers, upload), the stack, mode and contrast, Register /
Cancel with progress, and after a run the view switch (before / after / Jacobian), the overlay
opacity, the numbers, the segment legend and the downloads; the rest of the page is Slicer's
views (trame-slicer's remote-rendered axial, 3D, coronal and sagittal views).  Every control has
an ``id`` (``dlir-...``) so that tests can find it.  Handlers only translate between the page's
state and the session; errors are shown as the one sentence the engine or the Lib gives.
"""

from __future__ import annotations

import logging
from pathlib import Path

from trame.app import TrameApp
from trame.widgets import html
from trame.widgets import vuetify3 as v
from trame_server.utils.asynchronous import create_task
from trame_vuetify.ui.vuetify3 import SinglePageWithDrawerLayout

from dlir.errors import CancelledError, DLIRError

from .inputs import InputFiles
from .session import BUSY, CONTRASTS, ROLES, Session

log = logging.getLogger(__name__)

#: the chooser labels of the inputs, in page order
ROLE_LABELS = {"fixed": "Fixed image", "moving": "Moving image", "movingLabels": "Moving labels (optional, propagated)",
               "fixedMask": "Fixed mask (optional)", "fixedLabels": "Fixed labels (optional, for Dice)"}
DOWNLOAD_ROUTE = "/dlir/download"
LAYOUT = "Axial Primary"


class RegistrationPage(TrameApp):
    """The DLIR page on a trame server, over a scene with Slicer's views."""

    def __init__(self, server, files: InputFiles, resultsFolder: Path, modelDirs: tuple[Path, ...] = ()) -> None:
        from trame_slicer.core import LayoutManager, SlicerApp
        from trame_slicer.rca_view import register_rca_factories

        super().__init__(server)
        self.slicer = SlicerApp()
        register_rca_factories(self.slicer.view_manager, self.server)
        self.layoutManager = LayoutManager(self.slicer.scene, self.slicer.view_manager, self.server)
        self.layoutManager.register_layout_dict(LayoutManager.default_grid_configuration())
        self.layoutManager.set_layout(LAYOUT)
        self.session = Session(self.slicer.scene, files, resultsFolder, modelDirs, self.slicer.display_manager.reset_views)
        self._initialState()
        self._build()
        for role in ROLES:
            self.state.change(role)(self._chooser(role))
        self.state.change("view", "opacity")(self._onView)
        self.ctrl.on_server_bind.add(self._addDownloadRoute)

    # ------------------------------------------------------------------ state
    def _initialState(self) -> None:
        stacks = self.session.stackChoices()
        names = [Path(s["value"]).stem for s in stacks]
        self.state.update({
            "trame__title": "DLIR registration",
            "files": [{"title": c.title, "value": c.value} for c in self.session.files.choices()],
            "stacks": stacks,
            "stack": stacks[names.index("brain-mri")]["value"] if "brain-mri" in names else (stacks[0]["value"] if stacks else None),
            "mode": "fast",
            "contrast": "auto",
            "running": False, "progress": 0, "step": "", "message": "", "messageType": "info",
            "hasResult": False, "view": "before", "opacity": 0.5,
            "summary": "", "dice": [], "legend": [], "downloads": [],
            **{role: None for role in ROLES},
        })

    def _say(self, text: str, kind: str = "info") -> None:
        self.state.message, self.state.messageType = text, kind

    def _chooser(self, role: str):
        def onChange(**_) -> None:
            key = self.state[role]
            if key == self.session.keys.get(role):
                return
            try:
                self.session.choose(role, key)
                self._say("")
            except DLIRError as error:
                self._say(str(error), "error")
                self.state[role] = self.session.keys.get(role)
            self._showInputs()
        return onChange

    def _showInputs(self) -> None:
        """The views and panel after a change of inputs: the pair as given, no result."""
        self.state.view = "before"
        self.session.show("before", float(self.state.opacity))
        self._renderViews()
        self._showResult()

    def _onView(self, view: str, opacity: float, **_) -> None:
        self.session.show(view, float(opacity))
        self._renderViews()

    def _renderViews(self) -> None:
        """Ask every view for a new frame: layer and opacity changes made on the scene's composite nodes (as the Lib
        makes them) do not trigger one by themselves."""
        for view in self.slicer.view_manager.get_views():
            view.schedule_render()

    # ------------------------------------------------------------------ actions
    def samplePair(self) -> None:
        """Choose the bundled sample pair (with its labels)."""
        try:
            self.session.chooseSamplePair()
            self._say("")
        except DLIRError as error:
            self._say(str(error), "error")
        self.state.update({role: self.session.keys.get(role) for role in ROLES})
        self._showInputs()

    def upload(self, files: list[dict]) -> None:
        """Keep the browser's files (size-limited); they join the file choosers."""
        names = []
        for file in files or []:
            content = file.get("content") or b""
            if isinstance(content, list):
                content = b"".join(content)
            try:
                names.append(self.session.files.saveUpload(str(file.get("name", "upload")), content))
            except DLIRError as error:
                self._say(str(error), "error")
                break
        else:
            self._say(f"uploaded {', '.join(n.partition(':')[2] for n in names)}: choose it in a list above", "info")
        self.state.files = [{"title": c.title, "value": c.value} for c in self.session.files.choices()]

    def register(self) -> None:
        """Start the registration as a task of its own, so that the page (Cancel, the views) stays served meanwhile."""
        create_task(self._register())

    async def _register(self) -> None:
        """Register off the event loop, with progress; one at a time."""
        if self.session.running:
            with self.state:
                self._say(BUSY, "warning")
            return
        with self.state:
            self.state.update(running=True, progress=0, step="starting", hasResult=False)
            self._say("")
        try:
            await self.session.register(self.state.stack, self.state.mode, self._progress, self.state.contrast)
            self.session.show("after", float(self.state.opacity))
            self.session.show3D()
            self.slicer.display_manager.reset_views()
            self._renderViews()
            with self.state:
                self.state.view = "after"
                self._say("")
        except CancelledError:
            with self.state:
                self._say("registration cancelled; nothing was kept", "info")
        except DLIRError as error:
            with self.state:
                self._say(str(error), "error")
        except Exception as error:  # the page must keep serving; the log has the details
            log.exception("registration failed")
            with self.state:
                self._say(f"the registration failed unexpectedly ({type(error).__name__}: {error})", "error")
        finally:
            with self.state:
                self.state.update(running=False, progress=100 if self.session.result else 0)
                self._showResult()

    def cancel(self) -> None:
        """Stop the running registration at its next step."""
        self.session.cancel()
        self.state.step = "cancelling"

    def _progress(self, step: str, fraction: float) -> None:
        with self.state:
            self.state.update(step=step, progress=round(100 * fraction))

    def _showResult(self) -> None:
        result = self.session.result
        numbers = self.session.numbers()
        self.state.update(
            hasResult=result is not None,
            summary=numbers.get("summary", ""),
            dice=[{"label": k, "before": f"{d['before']:.3f}", "after": f"{d['after']:.3f}"} for k, d in numbers.get("dice", {}).items()],
            legend=[{"name": s["name"], "css": "rgb({}, {}, {})".format(*s["rgb"])} for s in self.session.segmentLegend()],
            downloads=[{"name": n, "href": f"{DOWNLOAD_ROUTE}/{result.folder.name}/{n}"} for n in result.files] if result else [],
        )

    # ------------------------------------------------------------------ downloads
    def _addDownloadRoute(self, wslinkServer) -> None:
        from aiohttp import web

        results = self.session.resultsFolder

        async def download(request: web.Request) -> web.StreamResponse:
            run, name = request.match_info["run"], request.match_info["name"]
            path = results / run / name
            if not run.startswith("run-") or "/" in name or name.startswith(".") or not path.is_file():
                raise web.HTTPNotFound()
            return web.FileResponse(path, headers={"Content-Disposition": f'attachment; filename="{name}"'})

        wslinkServer.app.router.add_get(DOWNLOAD_ROUTE + "/{run}/{name}", download)

    # ------------------------------------------------------------------ page
    def _build(self) -> None:
        with SinglePageWithDrawerLayout(self.server, width=400) as self.ui:
            self.ui.title.set_text("DLIR registration")
            with self.ui.drawer, html.Div(classes="pa-3 d-flex flex-column ga-2"):
                v.VBtn("Sample pair (MNI brain)", id="dlir-sample", click=self.samplePair, disabled=("running",),
                       prepend_icon="mdi-brain", variant="tonal")
                for role, label in ROLE_LABELS.items():
                    v.VSelect(id=f"dlir-{role}", label=label, v_model=(role,), items=("files",), clearable=role not in ("fixed", "moving"),
                              density="compact", hide_details=True, disabled=("running",), menu_props=("{ maxHeight: 600 }",))
                v.VFileInput(id="dlir-upload", label="Upload images (NIfTI, NRRD, MHA)", multiple=True, density="compact",
                             hide_details=True, disabled=("running",),
                             change=(f"trigger('{self.ctrl.trigger_name(self.upload)}', [$event.target.files])"))
                v.VSelect(id="dlir-stack", label="Stack", v_model=("stack",), items=("stacks",), density="compact",
                          hide_details=True, disabled=("running",))
                html.Div("{{ (stacks.find(s => s.value === stack) || {}).description }}", id="dlir-stack-description",
                         classes="text-caption")
                with v.VBtnToggle(v_model=("mode",), mandatory=True, density="compact", divided=True, disabled=("running",)):
                    v.VBtn("Fast", id="dlir-mode-fast", value="fast")
                    v.VBtn("Accurate", id="dlir-mode-accurate", value="accurate")
                with v.VBtnToggle(v_model=("contrast",), mandatory=True, density="compact", divided=True, disabled=("running",)):
                    for value, text in CONTRASTS.items():
                        v.VBtn(text, id=f"dlir-contrast-{value}", value=value)
                html.Div("Contrast: images of the same contrast are compared by their intensities, images of different "
                         "contrasts (MR and CT, T1 and T2) by their local structure (MIND descriptors); Automatic decides "
                         "from the images and the results line says which it chose.", id="dlir-contrast-help",
                         classes="text-caption")
                with html.Div(classes="d-flex ga-2"):
                    v.VBtn("Register", id="dlir-register", color="primary", click=self.register, disabled=("running",))
                    v.VBtn("Cancel", id="dlir-cancel", click=self.cancel, disabled=("!running",))
                v.VProgressLinear(id="dlir-progress", model_value=("progress",), height=6, v_show=("running",))
                html.Div("{{ step }}", id="dlir-step", classes="text-caption", v_show=("running",))
                v.VAlert("{{ message }}", id="dlir-message", v_show=("message",), type=("messageType",), density="compact")
                with v.VBtnToggle(v_model=("view",), mandatory=True, density="compact", divided=True):
                    v.VBtn("Before", id="dlir-view-before", value="before")
                    v.VBtn("After", id="dlir-view-after", value="after", disabled=("!hasResult",))
                    v.VBtn("Jacobian", id="dlir-view-jacobian", value="jacobian", disabled=("!hasResult",))
                v.VSlider(id="dlir-opacity", label="Overlay", v_model=("opacity",), min=0, max=1, step=0.05,
                          density="compact", hide_details=True, disabled=("view === 'jacobian'",))
                with html.Div(v_if=("hasResult",), classes="d-flex flex-column ga-2"):
                    html.Div("{{ summary }}", id="dlir-summary", classes="text-body-2")
                    with html.Table(id="dlir-dice", classes="text-body-2", v_show=("dice.length",)):
                        html.Tr("<th>label</th><th>Dice before</th><th>after</th>")
                        with html.Tr(v_for="row in dice", key="row.label"):
                            html.Td("{{ row.label }}")
                            html.Td("{{ row.before }}")
                            html.Td("{{ row.after }}")
                    with html.Div(id="dlir-legend", classes="d-flex flex-wrap ga-2"):
                        with html.Span(v_for="s in legend", key="s.name", classes="text-caption"):
                            html.Span(classes="d-inline-block mr-1", style=("`width: 10px; height: 10px; background: ${s.css}`",))
                            html.Span("{{ s.name }}")
                    with html.Div(id="dlir-downloads", classes="d-flex flex-wrap ga-2"):
                        html.A("{{ d.name }}", v_for="d in downloads", key="d.name", href=("d.href",),
                               download=("d.name",), id=("`dlir-download-${d.name}`",), classes="text-body-2")
            with self.ui.content:
                self.layoutManager.initialize_layout_grid(self.ui)


