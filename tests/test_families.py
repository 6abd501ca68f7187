"""The paper's placement on the long tail: optional-argument blocks, Res2Net, Inception, mobile nets, SE-3x3,
detection and segmentation backbones, and a conversion that breaks never passing for a good one."""
import json

import pytest
import timm
import torch
import torchvision
from timm.layers import SEModule

import seify
from conftest import outputs, realistic
from seify.equivalence import difference
from seify.errors import SeifyError
from seify.options import SEOptions
from seify.surgery import add_se as convert

SIZE = (3, 64, 64)


def preserved(original, converted, size=64):
    expected = outputs(original, size)
    return (outputs(converted, size) - expected).abs().max() <= 1e-5 * expected.abs().max()


def test_blocks_called_without_their_optional_shortcut_keep_their_sum():
    """timm's DlaBasic is forward(x, shortcut=None): half its calls pass no shortcut and sum x instead."""
    model = realistic(timm.create_model("dla34"))
    result = convert(model, SEOptions(), SIZE)
    assert len(result.sites) == 12 and preserved(model, result.model)
    called_without = [s for s in result.sites if s.owner.endswith("tree2")]  # DlaTree passes no shortcut there
    assert called_without and all(s.compensation.startswith("x2 folded") for s in called_without)


def test_res2net_gets_one_block_per_residual_unit_like_timms_se_res2net():
    model = realistic(timm.create_model("res2net50_26w_4s"))
    result = convert(model, SEOptions(), SIZE)
    assert len(result.sites) == 16 and preserved(model, result.model)
    twin = timm.create_model("res2net50_26w_4s", block_args=dict(attn_layer=SEModule)).eval()
    twin.load_state_dict(result.model.state_dict(), strict=True)
    assert torch.equal(outputs(twin), outputs(result.model))


@pytest.mark.parametrize("base,twin", [("resnext26ts", "seresnext26ts"), ("resnet33ts", "seresnet33ts")])
def test_se_3x3_reaches_timms_byobnet_twins(base, twin):
    model = realistic(timm.create_model(base))
    result = convert(model, SEOptions(variant="3x3"), SIZE)
    assert preserved(model, result.model) and all(s.path.endswith(".attn") for s in result.sites)
    native = timm.create_model(twin).eval()
    native.load_state_dict(result.model.state_dict(), strict=True)
    assert torch.equal(outputs(native), outputs(result.model))


def test_a_scaled_residual_branch_gets_se_before_its_scale_like_timms_nf_seresnet():
    """Normalizer-free ResNets sum ``out * alpha + shortcut``: still a residual branch, with SE before the scale.
    timm's NF SE-ResNet multiplies its SE output by attn_gain 2, which is the fresh gate's x2 here."""
    model = realistic(timm.create_model("nf_resnet26"))
    result = convert(model, SEOptions(), SIZE)
    assert result.placement == "residual" and len(result.sites) == 8 and preserved(model, result.model)
    assert all(s.compensation == "gate scaled x2" for s in result.sites)
    native = timm.create_model("nf_seresnet26").eval()
    native.load_state_dict({k.replace(".se.", ".attn_last."): v for k, v in result.model.state_dict().items()},
                           strict=True)
    assert torch.equal(outputs(native), outputs(result.model))
    with pytest.raises(SeifyError, match="already have an SE-style gate"):  # NFNets carry SE in every block
        convert(realistic(timm.create_model("test_nfnet")), SEOptions(), SIZE)


def test_se_3x3_in_a_resnet_bottleneck_sits_on_the_mid_channels():
    model = realistic(timm.create_model("resnet50"))
    sites = convert(model, SEOptions(variant="3x3"), SIZE).sites
    assert [s.channels for s in sites[:3]] == [64, 64, 64] and sites[0].after == "layer1.0.act2"
    mids = [64] * 3 + [128] * 4 + [256] * 6 + [512] * 3
    reduced = {c: timm.layers.make_divisible(c / 16, 8, round_limit=0) for c in mids}
    assert sum(s.params for s in sites) == sum(2 * c * reduced[c] + reduced[c] + c for c in mids)


@pytest.mark.parametrize("spec,size,count", [("inception_v3", 299, 11), ("torchvision:googlenet", 96, 9),
                                             ("torchvision:inception_v3", 299, 11)])
def test_inception_gets_one_block_per_module_output(spec, size, count):
    result = seify.convert(spec, input_size=(3, size, size), dry_run=True)
    assert result.placement == "module" and len(result.sites) == count
    assert result.max_abs_diff == 0.0 and all(s.path.split(".")[-2].lower().startswith(("mixed", "inception"))
                                              for s in result.sites)


def test_mobilenet_module_placement_gives_the_papers_table_3():
    """SE-MobileNet: 4.2M -> 4.7M, one block per depthwise-separable block output, 2/16 x sum C^2."""
    from seify.profile import profile
    report = profile("mobilenetv1_100", SEOptions(at="module"), latency=False).to_dict()
    assert len(report["sites"]) == 13
    reduced = {c: timm.layers.make_divisible(c / 16, 8, round_limit=0) for c in (s["channels"] for s in
                                                                                 report["sites"])}
    assert report["added_params"] == sum(2 * c * reduced[c] + reduced[c] + c for c in (s["channels"] for s in
                                                                                        report["sites"]))
    assert round(report["base"]["params"] / 1e6, 1) == 4.2 and round(report["se"]["params"] / 1e6, 1) == 4.7
    every_activation = profile("mobilenetv1_100", latency=False).to_dict()
    assert len(every_activation["sites"]) == 27  # auto keeps the VGG placement for a model without modules


def test_torchvision_detector_backbone_without_downloads(tmp_path, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise AssertionError("seify reached for the network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    model = realistic(torchvision.models.get_model("fasterrcnn_resnet50_fpn", weights=None, weights_backbone=None,
                                                   min_size=128, max_size=128, box_score_thresh=0.0))
    result = convert(model, SEOptions(), SIZE)
    assert result.scope == "backbone.body" and len(result.sites) == 16
    assert result.sites[0].path == "backbone.body.layer1.0.se"
    x = torch.randn(2, *SIZE, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        before, after = model.backbone.body(x), result.model.backbone.body(x)
        assert all(torch.allclose(before[k], after[k], atol=1e-5, rtol=1e-5) for k in before)
        det_before, det_after = model(list(x)), result.model(list(x))
    assert all(len(d["boxes"]) > 0 for d in det_before)  # every score kept: there are detections to compare
    checked = difference(det_before, det_after)  # boxes, scores and labels, each against its own scale
    assert checked.agrees, checked.why()
    from seify.models import freeze_batchnorm
    freeze_batchnorm(model)  # what a pretrained detector has: its norms' affine terms are buffers
    frozen = convert(model, SEOptions(), SIZE)
    assert frozen.sites[0].compensation == "x2 folded into backbone.body.layer1.0.bn3"  # into its buffers
    with torch.no_grad():
        want, got = model.backbone.body(x), frozen.model.backbone.body(x)
    assert all(torch.allclose(want[k], got[k], atol=1e-5, rtol=1e-5) for k in want)
    path = seify.save(frozen, tmp_path / "frcnn-se.safetensors", model="torchvision:fasterrcnn_resnet50_fpn")
    reloaded = seify.load(path)
    with torch.no_grad():
        got, want = reloaded.backbone.body(x), frozen.model.backbone.body(x)
    assert all(torch.equal(got[k], want[k]) for k in want)


def test_detectors_and_segmenters_by_name_without_downloads(cli, monkeypatch):
    import urllib.request

    def offline(*args, **kwargs):
        raise AssertionError("seify reached for the network")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    detector = seify.resolve("torchvision:fasterrcnn_resnet50_fpn")
    assert detector.num_classes == 91 and detector.weights == "random"
    code, stdout, err = cli("convert", "torchvision:fcn_resnet50", "--dry-run", "--json", "--input-size", "3,64,64")
    assert code == 0, err
    report = json.loads(stdout)
    assert len(report["sites"]) == 16 and report["max_abs_diff"] == 0.0


def test_segmentation_backbone_round_trip(tmp_path):
    result = seify.convert("torchvision:fcn_resnet50", input_size=SIZE)
    assert result.scope == "backbone" and len(result.sites) == 16 and result.max_abs_diff == 0.0
    path = seify.save(result, tmp_path / "fcn-se.safetensors")
    reloaded = seify.load(path)
    x = torch.randn(1, *SIZE)
    with torch.no_grad():
        assert torch.equal(reloaded(x)["out"], result.model.eval()(x)["out"])


def test_a_broken_conversion_is_never_reported_as_fine(cli, monkeypatch, tmp_path, tiny):
    """Reintroduce the bug the tracing fix removed (blocks traced with every optional argument a proxy): convert,
    the dry run, profile and finetune must all refuse the result."""
    import seify.surgery as surgery
    monkeypatch.setattr(surgery, "_fixed_arguments", lambda *args: {})
    for command in (["convert", "dla34", "-o", tmp_path / "x.safetensors"], ["convert", "dla34", "--dry-run"],
                    ["profile", "dla34", "--no-latency"],
                    ["finetune", "dla34", tiny, "--out", tmp_path / "run", "--img-size", "32"]):
        code, _, err = cli(*command)
        assert code == 2 and "changed what it computes beyond the SE blocks" in err, (command, err)
        assert "seify bug (" not in err
    assert not (tmp_path / "x.safetensors").exists()


def test_stage_numbers_follow_the_stride_in_every_family():
    """Stage N runs at stride 2^N: ResNet's layer1 (conv2_x) is 2; VGG's conv1_x, at stride 1, is 0."""
    from seify.sites import find_sites
    with torch.device("meta"):
        resnet, vgg = timm.create_model("resnet50"), timm.create_model("vgg11_bn")
        stages = [s.stage for s in find_sites(resnet, SEOptions(), SIZE)[2]]
        assert stages == [2] * 3 + [3] * 4 + [4] * 6 + [5] * 3
        assert sorted({s.stage for s in find_sites(vgg, SEOptions(), SIZE)[2]}) == [0, 1, 2, 3, 4]
        assert {s.stage for s in find_sites(vgg, SEOptions(stages=(0,)), SIZE)[2]} == {0}


def test_network_errors_are_input_problems(cli, monkeypatch):
    import torch.hub

    def offline(*args, **kwargs):
        import urllib.error
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    code, _, err = cli("convert", "torchvision:fasterrcnn_resnet50_fpn", "--pretrained", "--dry-run")
    assert code == 2 and "are you offline" in err and "seify bug" not in err


# ------------------------------------------------------------------ every timm family

NO_CONV = "no convolutional residual branches and no activations after convolutions"  # transformers, MLPs
GATED = "already have an SE-style gate"  # SE-Nets and MaxViT carry their own
TRAINING_BRANCH = "its forward branches on training mode"  # Swin's attention masks
UNTRACEABLE = "cannot trace"  # data-dependent control flow torch.fx cannot follow
UNTRACEABLE_SHAPE = "cannot take an input"  # Hiera's tracing loses a tensor
FAMILIES = {  # timm family: (its smallest model, the input size it is converted at)
    "byoanet": ("halonet_h1", 256), "byobnet": ("mobileone_s1", 64), "convmixer": ("convmixer_768_32", 64),
    "convnext": ("test_convnext", 64), "cpubone": ("cpubone_nano", 64), "csatv2": ("csatv2", 64),
    "cspnet": ("cs3darknet_focus_s", 64), "cspnext": ("cspnext_tiny", 64), "davit": ("davit_tiny", 64),
    "densenet": ("densenet121", 64), "dla": ("dla46x_c", 64), "dpn": ("dpn48b", 64),
    "edgenext": ("edgenext_xx_small", 64), "efficientformer": ("efficientformer_l1", 224),
    "efficientformer_v2": ("efficientformerv2_s0", 224), "efficientnet": ("efficientnet_lite0", 64),
    "efficientvim": ("efficientvim_m1", 64), "efficientvit_mit": ("efficientvit_b0", 64),
    "efficientvit_msra": ("efficientvit_m0", 224), "fasternet": ("fasternet_t0", 64), "fastvit": ("fastvit_t8", 64),
    "focalnet": ("focalnet_tiny_srf", 64), "gcvit": ("gcvit_xxtiny", 224), "ghostnet": ("ghostnet_050", 64),
    "hardcorenas": ("hardcorenas_b", 64), "hgnet": ("hgnetv2_b0", 64), "hrnet": ("hrnet_w18_small", 64),
    "iformer": ("iformer_t", 64), "inception_next": ("inception_next_atto", 64),
    "inception_resnet_v2": ("inception_resnet_v2", 299), "inception_v3": ("inception_v3", 299),
    "inception_v4": ("inception_v4", 299), "lcnetv2": ("lcnetv2_small", 64), "levit": ("levit_128s", 224),
    "lowformer": ("lowformer_b0", 64), "mambaout": ("test_mambaout", 64), "metaformer": ("poolformerv2_s12", 64),
    "mobilenetv3": ("mobilenetv3_small_050", 64), "mobilenetv5": ("mobilenetv5_base", 64),
    "mobilevit": ("mobilevit_xxs", 64), "nasnet": ("nasnetalarge", 64), "nest": ("nest_tiny", 224),
    "nextvit": ("nextvit_small", 64), "nfnet": ("nf_resnet26", 64), "pit": ("pit_ti_224", 224),
    "pnasnet": ("pnasnet5large", 64), "rdnet": ("rdnet_tiny", 64), "regnet": ("regnetx_002", 64),
    "repghost": ("repghostnet_050", 64), "repvit": ("repvit_m1", 64), "res2net": ("res2next50", 64),
    "resnest": ("resnest14d", 64), "resnet": ("resnet10t", 64), "resnetv2": ("resnetv2_18", 64),
    "rexnet": ("rexnet_100", 64), "selecsls": ("selecsls42", 64), "shvit": ("shvit_s1", 64),
    "sknet": ("skresnet18", 64), "starnet": ("starnet_s050", 64), "swiftformer": ("swiftformer_xs", 224),
    "tiny_vit": ("tiny_vit_5m_224", 64), "tresnet": ("tresnet_m", 64), "vgg": ("vgg11", 64),
    "visformer": ("visformer_tiny", 224), "vision_transformer_hybrid": ("vit_tiny_r_s16_p8_224", 224),
    "vitamin": ("vitamin_small_224", 224), "volo": ("volo_d1_224", 224), "vovnet": ("ese_vovnet19b_slim_dw", 64),
    "xception": ("legacy_xception", 64), "xception_aligned": ("xception41p", 64),
    "xcit": ("xcit_nano_12_p8_224", 224),
}
SKIPPED = {  # timm family: (its smallest model, why seify converts none of it)
    "beit": ("beit_base_patch16_224", NO_CONV), "cait": ("cait_xxs24_224", NO_CONV), "coat": ("coat_tiny", NO_CONV),
    "convit": ("convit_tiny", NO_CONV), "crossvit": ("crossvit_tiny_240", NO_CONV),
    "deepseek_vit": ("deepseek_vit_412m", NO_CONV), "deit": ("deit_tiny_patch16_224", NO_CONV),
    "eva": ("eva02_tiny_patch14_224", NO_CONV), "gemma4_vit": ("gemma4_vit_167m", UNTRACEABLE),
    "hiera": ("hiera_tiny_224", UNTRACEABLE_SHAPE), "hieradet_sam2": ("sam2_hiera_tiny", NO_CONV),
    "maxxvit": ("maxvit_pico_rw_256", GATED), "mlp_mixer": ("gmlp_ti16_224", NO_CONV),
    "mvitv2": ("mvitv2_tiny", NO_CONV), "naflexvit": ("naflexvit_base_patch16_parfac_gap", NO_CONV),
    "pvt_v2": ("pvt_v2_b0", NO_CONV), "qwen3_vit": ("qwen3_vit_88m", NO_CONV), "senet": ("legacy_seresnet18", GATED),
    "sequencer": ("sequencer2d_s", NO_CONV), "swin_transformer": ("swin_tiny_patch4_window7_224", TRAINING_BRANCH),
    "swin_transformer_v2": ("swinv2_tiny_window16_256", TRAINING_BRANCH),
    "swin_transformer_v2_cr": ("swinv2_cr_tiny_224", UNTRACEABLE), "tnt": ("tnt_s_legacy_patch16_224", NO_CONV),
    "twins": ("twins_svt_small", NO_CONV), "vision_transformer": ("test_vit", NO_CONV),
    "vision_transformer_relpos": ("test_vit_relpos", NO_CONV),
    "vision_transformer_sam": ("samvit_base_patch16_224", NO_CONV),
}


def test_every_timm_family_is_covered_or_skipped_with_a_reason():
    families = {f for f in timm.list_modules() if timm.list_models(module=f)}
    assert families == set(FAMILIES) | set(SKIPPED), sorted(families ^ (set(FAMILIES) | set(SKIPPED)))


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_one_model_of_each_family_converts_exactly(family):
    name, size = FAMILIES[family]
    model = realistic(timm.create_model(name))
    result = convert(model, SEOptions(), (3, size, size))
    assert result.sites and preserved(model, result.model, size)


@pytest.mark.slow
@pytest.mark.parametrize("family", sorted(SKIPPED))
def test_skipped_families_say_why_in_one_line(family):
    name, reason = SKIPPED[family]
    with torch.device("meta"):  # the reason shows before any weight is needed
        model = timm.create_model(name)
        size = timm.data.resolve_model_data_config(model)["input_size"][1]
        with pytest.raises(SeifyError, match=reason):
            convert(model, SEOptions(), (3, size, size))
