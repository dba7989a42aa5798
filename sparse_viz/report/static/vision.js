// Vision-token masking report: each image with a D3 heatmap overlay of its tokens' impact.
// Data come from SV.data (report/vision.py); strings reach the DOM only via textContent/.text().
"use strict";
(function () {
  const data = SV.data;
  const tip = SV.tooltip();
  const slider = document.getElementById("layer-slider");
  const layerLabel = document.getElementById("layer-label");
  const variantSelect = document.getElementById("variant-select");
  const stepSelect = document.getElementById("step-select");
  const opacitySlider = document.getElementById("opacity-slider");
  const nLayers = data.layers.length;
  const MAX_WIDTH = 448;

  function fillSelect(select, values, label) {
    for (const value of values) {
      const option = document.createElement("option");
      option.value = String(value);
      option.textContent = label(value);
      select.appendChild(option);
    }
  }
  fillSelect(variantSelect, data.variants, (v) => v);
  fillSelect(stepSelect, data.steps, (s) => (s === 0 ? "0 (prompt)" : String(s)));
  slider.max = String(nLayers); // the position after the last layer = all layers
  slider.value = String(nLayers);

  document.getElementById("summary").textContent =
    `${data.meta.model} · mask ${data.meta.mask} · vision token ranges ${JSON.stringify(data.meta.ranges)} · ` +
    `${data.meta.num_image_tokens} image tokens`;
  document.getElementById("prompt-text").textContent = data.meta.prompt || "";
  document.getElementById("generated-text").textContent = data.meta.generated_text || "";
  const definitions = document.getElementById("definitions");
  for (const [name, text] of Object.entries(data.definitions)) {
    const dt = document.createElement("dt");
    dt.textContent = name;
    const dd = document.createElement("dd");
    dd.textContent = text;
    definitions.append(dt, dd);
  }

  const state = () => ({
    metric: document.querySelector("input[name=metric]:checked").value,
    variant: variantSelect.value,
    step: stepSelect.value,
    layer: Number(slider.value),
  });

  // values of one image for the current state: row-major cell list (null = not analysed)
  function cellValues(image, s) {
    const byStep = s.layer >= nLayers ? image.aggregate[s.step] : image.values[s.step];
    if (!byStep || !byStep[s.variant]) return null;
    const metric = byStep[s.variant][s.metric];
    return s.layer >= nLayers ? metric : metric[s.layer];
  }

  const container = d3.select("#images");
  const views = data.images.map((image) => {
    const scale = Math.min(1, MAX_WIDTH / image.width) * Math.max(1, 256 / image.width);
    const width = image.width * scale;
    const height = image.height * scale;
    const figure = container.append("div").attr("class", "vision-image").append("figure");
    const svg = figure.append("svg").attr("width", width).attr("height", height)
      .attr("viewBox", `0 0 ${image.width} ${image.height}`).attr("data-image", image.index);
    svg.append("image").attr("href", image.src).attr("width", image.width).attr("height", image.height)
      .attr("preserveAspectRatio", "none");
    const cells = [];
    for (let r = 0; r < image.rows; r++) for (let c = 0; c < image.cols; c++) cells.push({ r, c, i: r * image.cols + c });
    const rects = svg.append("g").attr("class", "overlay").selectAll("rect").data(cells).join("rect")
      .attr("class", "cell")
      .attr("x", (d) => d.c * image.cell).attr("y", (d) => d.r * image.cell)
      .attr("width", image.cell).attr("height", image.cell);
    const caption = figure.append("figcaption");
    const legend = figure.append("div").attr("class", "legend-bar");
    return { image, rects, caption, legend };
  });

  function render() {
    const s = state();
    layerLabel.textContent = s.layer >= nLayers ? "all layers (mean)" : `layer ${data.layers[s.layer]}`;
    const opacity = Number(opacitySlider.value);
    for (const view of views) {
      const values = cellValues(view.image, s) || [];
      const finite = values.filter((v) => v !== null && Number.isFinite(v));
      // Colour spans this view's own range, so differences between tokens stay visible.
      const min = finite.length ? d3.min(finite) : 0;
      const max = finite.length ? d3.max(finite) : 0;
      const color = d3.scaleSequential(d3.interpolateInferno).domain([min, max > min ? max : min + 1]);
      view.rects
        .attr("fill", (d) => (values[d.i] === null || values[d.i] === undefined ? "transparent" : color(values[d.i])))
        .attr("fill-opacity", opacity)
        .attr("data-value", (d) => (values[d.i] === null || values[d.i] === undefined ? "" : String(values[d.i])))
        .on("mousemove", (event, d) => {
          const position = view.image.start + d.i;
          tip.show(event, `image ${view.image.index} · row ${d.r}, col ${d.c} · position ${position}\n` +
            `${s.metric}: ${SV.format(values[d.i])}`);
        })
        .on("mouseleave", () => tip.hide());
      view.caption.text(`image ${view.image.index}: ${view.image.rows}×${view.image.cols} tokens, ` +
        `${view.image.width}×${view.image.height} px as the model saw it`);
      // A drawn colour scale, not only words: the same interpolator and domain as the cells.
      view.legend.selectAll("*").remove();
      SV.colorLegend(view.legend.node(), color, { title: `${s.metric} distance when the patch's token is masked (${s.variant})`, width: 220 });
    }
  }

  for (const input of document.querySelectorAll("input[name=metric]")) input.addEventListener("change", render);
  for (const control of [variantSelect, stepSelect]) control.addEventListener("change", render);
  slider.addEventListener("input", render);
  opacitySlider.addEventListener("input", render);
  render();
  SV.markReady();
})();
