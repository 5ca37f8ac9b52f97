// LoRAtorio: one-sentence tooltips for the accordion's settings (A1111 and Forge call onUiUpdate).
(function () {
    const tips = {
        "LoRAtorio": "Compose the prompt's <lora:...> tags per step and per region instead of merging them into the model.",
        "Mode": "LoRAtorio composes per patch; Composite, Switch and Merge are the published baselines, for comparison.",
        "Patch size (fraction or pixels)": "Side of the latent patches whose similarity to the base model decides which LoRA owns them (1 latent pixel = 8 image pixels).",
        "Weighting": "How a patch's divergences become weights: contrast (default; each LoRA's divergence over its own mean, so where a LoRA acts decides, not how strongly), softmin (the paper's), power, spread, median, rank.",
        "Temperature (tau)": "How decisively a patch goes to the most divergent LoRA: small values give one LoRA per patch, large ones a blend (contrast's 3: weights grow as (divergence / the LoRA's own mean) ** 1/3).",
        "Re-centering (lam)": "Share of the base model in the negative branch; 1 skips the LoRAs' negative passes (faster).",
        "Pool (folder or named pool)": "A folder of LoRAs, a pool named in the LoRAtorio tab, or LoRA names separated by commas, to choose from.",
        "Top-k (0: all)": "Keep only the k LoRAs (prompt and pool together) most relevant to each image; 0 keeps them all.",
        "Reselect every": "Steps between choices of the top-k LoRAs; between them only the kept ones run (faster).",
        "Show weight maps": "Add a picture per LoRA showing which regions it owned, averaged over the steps.",
        "Exact every K steps (1: every step; more: gated single pass between, faster)": "1 runs base + every LoRA at every step (the method); K > 1 does so only on the first steps and every K-th, and between runs one row with every LoRA gated by its latest weight map (about 2 rows a step, like merge). 2 kept the method's quality on both synthetic benchmarks; 3 costs fewer rows and loses some with 4-5 LoRAs.",
        "Negative branch LoRAs (lam < 1; reuse: faster)": "evaluate: every LoRA also runs the negative prompt (2N + 2 model rows a step, the paper). reuse: the negative branch takes the LoRAs' change from the positive one (N + 2 rows, as at lam 1); on the synthetic benchmarks it kept most of the quality (README).",
        "Exact first steps (gated single pass)": "With Exact every above 1: how many leading steps run the full method, where the layout is decided.",
    };
    onUiUpdate(function () {
        document.querySelectorAll("[id^='script_txt2img_loratorio_'], [id^='script_img2img_loratorio_']").forEach(function (root) {
            root.querySelectorAll("span, label, button").forEach(function (element) {
                const tip = tips[element.textContent.trim()];
                if (tip && !element.title) {
                    element.title = tip;
                }
            });
        });
    });
})();
