namespace Vct.Core

open Vct.Core.Platform
open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open TorchSharp
open Vct.Core.Backbone
open Vct.Core.Fusion
open Vct.Core.PixelDecoder
open Vct.Core.QueryGen
open Vct.Core.Decoder
open Vct.Core.Layers
open Vct.Core.Checkpoint

/// VctConfig <-> JSON (every field written; reading fails naming the missing or malformed field).
[<RequireQualifiedAccess>]
module ConfigJson =
    let private arr (xs: 'a seq) (f: 'a -> JsonNode) = JsonArray([| for x in xs -> f x |]) :> JsonNode
    let private num (x: int64) = JsonValue.Create x :> JsonNode
    let private fl (x: float) = JsonValue.Create x :> JsonNode

    let private subsetName (s: Subset) =
        match s with Subset.S4 -> "s4" | Subset.MS3 -> "ms3" | Subset.AVSS -> "avss"

    /// The config as a JSON object.
    let toJson (c: VctConfig) : JsonObject =
        let s = c.Swin
        let p = c.PixelDecoder
        let d = c.Decoder
        let q = d.Query
        JsonObject(
            [ KeyValuePair("subset", JsonValue.Create(subsetName c.Subset) :> JsonNode)
              KeyValuePair("use_pre_sam", JsonValue.Create c.UsePreSam)
              KeyValuePair("audio_mlp_hidden", num c.AudioMlpHidden)
              KeyValuePair("image_size", num c.ImageSize)
              KeyValuePair("size_divisibility", num c.SizeDivisibility)
              KeyValuePair("output_size", num c.OutputSize)
              KeyValuePair(
                  "swin",
                  JsonObject(
                      [ KeyValuePair("patch_size", num s.PatchSize); KeyValuePair("in_chans", num s.InChans)
                        KeyValuePair("embed_dim", num s.EmbedDim)
                        KeyValuePair("depths", arr s.Depths (fun x -> JsonValue.Create x))
                        KeyValuePair("num_heads", arr s.NumHeads num)
                        KeyValuePair("window_size", num s.WindowSize); KeyValuePair("mlp_ratio", fl s.MlpRatio)
                        KeyValuePair("qkv_bias", JsonValue.Create s.QkvBias)
                        KeyValuePair("qk_scale", (match s.QkScale with Some v -> fl v | None -> null))
                        KeyValuePair("drop_rate", fl s.DropRate); KeyValuePair("attn_drop_rate", fl s.AttnDropRate)
                        KeyValuePair("drop_path_rate", fl s.DropPathRate); KeyValuePair("patch_norm", JsonValue.Create s.PatchNorm)
                        KeyValuePair("out_indices", arr s.OutIndices (fun x -> JsonValue.Create x)) ]) :> JsonNode)
              KeyValuePair(
                  "pixel_decoder",
                  JsonObject(
                      [ KeyValuePair("in_channels", arr p.InChannels num); KeyValuePair("in_strides", arr p.InStrides num)
                        KeyValuePair("transformer_levels", JsonValue.Create p.TransformerLevels :> JsonNode)
                        KeyValuePair("conv_dim", num p.ConvDim); KeyValuePair("mask_dim", num p.MaskDim)
                        KeyValuePair("group_norm_groups", num p.GroupNormGroups); KeyValuePair("num_heads", num p.NumHeads)
                        KeyValuePair("num_points", num p.NumPoints); KeyValuePair("enc_layers", JsonValue.Create p.EncLayers)
                        KeyValuePair("dim_feedforward", num p.DimFeedforward); KeyValuePair("dropout", fl p.Dropout)
                        KeyValuePair("common_stride", num p.CommonStride) ]) :> JsonNode)
              KeyValuePair(
                  "decoder",
                  JsonObject(
                      [ KeyValuePair("hidden_dim", num d.HiddenDim); KeyValuePair("num_queries", num d.NumQueries)
                        KeyValuePair("num_heads", num d.NumHeads); KeyValuePair("dim_feedforward", num d.DimFeedforward)
                        KeyValuePair("dec_layers", JsonValue.Create d.DecLayers :> JsonNode)
                        KeyValuePair("num_classes", num d.NumClasses)
                        KeyValuePair("proto_projections", JsonValue.Create d.ProtoProjections)
                        KeyValuePair(
                            "query",
                            JsonObject(
                                [ KeyValuePair("channels", num q.Channels); KeyValuePair("num_pixels", num q.NumPixels)
                                  KeyValuePair("num_queries", num q.NumQueries)
                                  KeyValuePair("num_prototypes", (match q.NumPrototypes with Some k -> num k | None -> null))
                                  KeyValuePair("prototype_heads", num q.PrototypeHeads) ]) :> JsonNode) ]) :> JsonNode) ])

    let private get (o: JsonObject) (path: string) (key: string) : JsonNode =
        let mutable v: JsonNode = null
        if o.TryGetPropertyValue(key, &v) then v
        else raise (InvalidDataException $"config: missing field '{path}{key}'")

    let private typed (what: string) (f: unit -> 'a) =
        try f () with
        | :? InvalidDataException -> reraise ()
        | e -> raise (InvalidDataException $"config: field '{what}' is malformed ({e.Message})")

    let private i64 o path k = typed (path + k) (fun () -> (get o path k).GetValue<int64>())
    let private i32 o path k = typed (path + k) (fun () -> (get o path k).GetValue<int>())
    let private f64 o path k = typed (path + k) (fun () -> (get o path k).GetValue<float>())
    let private bool o path k = typed (path + k) (fun () -> (get o path k).GetValue<bool>())
    let private obj o path k = typed (path + k) (fun () -> (get o path k).AsObject())
    let private i64s o path k = typed (path + k) (fun () -> [| for x in (get o path k).AsArray() -> x.GetValue<int64>() |])
    let private i32s o path k = typed (path + k) (fun () -> [| for x in (get o path k).AsArray() -> x.GetValue<int>() |])
    let private opt o path k f = match (get o path k) with null -> None | _ -> Some(f o path k)

    /// Range checks of every config value, run before a model is built: a value outside its range (or parts that do
    /// not fit together) fails naming the field, instead of a LibTorch error, a division by zero or an allocation
    /// that cannot succeed.
    let checkRanges (c: VctConfig) : VctConfig =
        let fail (field: string) (why: string) = raise (InvalidDataException $"config: field '{field}' {why}")
        let within (field: string) (lo: int64) (hi: int64) (v: int64) =
            if v < lo || v > hi then fail field $"must be in {lo}..{hi}, got {v}"
        let rate (field: string) (v: float) =
            if not (v >= 0.0 && v < 1.0) then fail field $"must be in [0, 1), got {v}"
        let s = c.Swin
        within "image_size" 32L 8192L c.ImageSize
        within "size_divisibility" 1L 1024L c.SizeDivisibility
        within "output_size" 1L 8192L c.OutputSize
        within "audio_mlp_hidden" 1L 65536L c.AudioMlpHidden
        within "swin.patch_size" 1L 64L s.PatchSize
        within "swin.in_chans" 1L 16L s.InChans
        within "swin.embed_dim" 1L 4096L s.EmbedDim
        within "swin.depths (count)" 1L 8L (int64 s.Depths.Length)
        s.Depths |> Array.iteri (fun i d -> within $"swin.depths[{i}]" 1L 64L (int64 d))
        if s.NumHeads.Length <> s.Depths.Length then
            fail "swin.num_heads" $"has {s.NumHeads.Length} entries for {s.Depths.Length} stages (swin.depths)"
        s.NumHeads |> Array.iteri (fun i h ->
            within $"swin.num_heads[{i}]" 1L 1024L h
            let dim = s.EmbedDim <<< i
            if dim % h <> 0L then fail $"swin.num_heads[{i}]" $"= {h} does not divide stage {i}'s {dim} channels")
        within "swin.window_size" 1L 64L s.WindowSize
        if not (s.MlpRatio > 0.0 && s.MlpRatio <= 64.0) then fail "swin.mlp_ratio" $"must be in (0, 64], got {s.MlpRatio}"
        s.QkScale |> Option.iter (fun q -> if not (q > 0.0 && Double.IsFinite q) then fail "swin.qk_scale" $"must be positive, got {q}")
        rate "swin.drop_rate" s.DropRate
        rate "swin.attn_drop_rate" s.AttnDropRate
        rate "swin.drop_path_rate" s.DropPathRate
        if s.OutIndices.Length = 0 then fail "swin.out_indices" "is empty"
        s.OutIndices |> Array.iteri (fun i k -> within $"swin.out_indices[{i}]" 0L (int64 s.Depths.Length - 1L) (int64 k))
        let p = c.PixelDecoder
        within "pixel_decoder.in_channels (count)" 1L 8L (int64 p.InChannels.Length)
        p.InChannels |> Array.iteri (fun i v -> within $"pixel_decoder.in_channels[{i}]" 1L 65536L v)
        if p.InStrides.Length <> p.InChannels.Length then
            fail "pixel_decoder.in_strides" $"has {p.InStrides.Length} entries for {p.InChannels.Length} inputs (pixel_decoder.in_channels)"
        p.InStrides |> Array.iteri (fun i v -> within $"pixel_decoder.in_strides[{i}]" 1L 1024L v)
        within "pixel_decoder.transformer_levels" 1L (int64 p.InChannels.Length) (int64 p.TransformerLevels)
        within "pixel_decoder.conv_dim" 1L 4096L p.ConvDim
        within "pixel_decoder.mask_dim" 1L 4096L p.MaskDim
        within "pixel_decoder.group_norm_groups" 1L p.ConvDim p.GroupNormGroups
        within "pixel_decoder.num_heads" 1L p.ConvDim p.NumHeads
        within "pixel_decoder.num_points" 1L 64L p.NumPoints
        within "pixel_decoder.enc_layers" 0L 64L (int64 p.EncLayers)
        within "pixel_decoder.dim_feedforward" 1L 65536L p.DimFeedforward
        rate "pixel_decoder.dropout" p.Dropout
        within "pixel_decoder.common_stride" 1L 1024L p.CommonStride
        let d = c.Decoder
        within "decoder.hidden_dim" 1L 4096L d.HiddenDim
        within "decoder.num_queries" 1L 10000L d.NumQueries
        within "decoder.num_heads" 1L d.HiddenDim d.NumHeads
        if d.HiddenDim % d.NumHeads <> 0L then fail "decoder.num_heads" $"= {d.NumHeads} does not divide decoder.hidden_dim = {d.HiddenDim}"
        within "decoder.dim_feedforward" 1L 65536L d.DimFeedforward
        within "decoder.dec_layers" 1L 64L (int64 d.DecLayers)
        within "decoder.num_classes" 1L 1000L d.NumClasses
        let q = d.Query
        within "decoder.query.channels" 1L 4096L q.Channels
        within "decoder.query.num_pixels" 1L (8192L * 8192L) q.NumPixels
        within "decoder.query.num_queries" 1L 10000L q.NumQueries
        q.NumPrototypes |> Option.iter (within "decoder.query.num_prototypes" 1L 1000L)
        within "decoder.query.prototype_heads" 1L q.Channels q.PrototypeHeads
        if q.Channels % q.PrototypeHeads <> 0L then
            fail "decoder.query.prototype_heads" $"= {q.PrototypeHeads} does not divide decoder.query.channels = {q.Channels}"
        // How the parts fit together (the models' own checks, as a config error).
        try
            s.Validate()
            p.Validate()
            c.Validate()
        with :? ArgumentException as e -> raise (InvalidDataException $"config: {e.Message}")
        c

    /// Reads a config written by `toJson`; every value is range-checked (`checkRanges`).
    let ofJson (o: JsonObject) : VctConfig =
        let s = obj o "" "swin"
        let p = obj o "" "pixel_decoder"
        let d = obj o "" "decoder"
        let q = obj d "decoder." "query"
        { Subset = typed "subset" (fun () -> Subset.Parse((get o "" "subset").GetValue<string>()))
          UsePreSam = bool o "" "use_pre_sam"
          AudioMlpHidden = i64 o "" "audio_mlp_hidden"
          ImageSize = i64 o "" "image_size"
          SizeDivisibility = i64 o "" "size_divisibility"
          OutputSize = i64 o "" "output_size"
          Swin =
            { PatchSize = i64 s "swin." "patch_size"; InChans = i64 s "swin." "in_chans"; EmbedDim = i64 s "swin." "embed_dim"
              Depths = i32s s "swin." "depths"; NumHeads = i64s s "swin." "num_heads"; WindowSize = i64 s "swin." "window_size"
              MlpRatio = f64 s "swin." "mlp_ratio"; QkvBias = bool s "swin." "qkv_bias"; QkScale = opt s "swin." "qk_scale" f64
              DropRate = f64 s "swin." "drop_rate"; AttnDropRate = f64 s "swin." "attn_drop_rate"
              DropPathRate = f64 s "swin." "drop_path_rate"; PatchNorm = bool s "swin." "patch_norm"
              OutIndices = i32s s "swin." "out_indices" }
          PixelDecoder =
            { InChannels = i64s p "pixel_decoder." "in_channels"; InStrides = i64s p "pixel_decoder." "in_strides"
              TransformerLevels = i32 p "pixel_decoder." "transformer_levels"; ConvDim = i64 p "pixel_decoder." "conv_dim"
              MaskDim = i64 p "pixel_decoder." "mask_dim"; GroupNormGroups = i64 p "pixel_decoder." "group_norm_groups"
              NumHeads = i64 p "pixel_decoder." "num_heads"; NumPoints = i64 p "pixel_decoder." "num_points"
              EncLayers = i32 p "pixel_decoder." "enc_layers"; DimFeedforward = i64 p "pixel_decoder." "dim_feedforward"
              Dropout = f64 p "pixel_decoder." "dropout"; CommonStride = i64 p "pixel_decoder." "common_stride" }
          Decoder =
            { HiddenDim = i64 d "decoder." "hidden_dim"; NumQueries = i64 d "decoder." "num_queries"
              NumHeads = i64 d "decoder." "num_heads"; DimFeedforward = i64 d "decoder." "dim_feedforward"
              DecLayers = i32 d "decoder." "dec_layers"; NumClasses = i64 d "decoder." "num_classes"
              ProtoProjections = bool d "decoder." "proto_projections"
              Query =
                { Channels = i64 q "decoder.query." "channels"; NumPixels = i64 q "decoder.query." "num_pixels"
                  NumQueries = i64 q "decoder.query." "num_queries"
                  NumPrototypes = opt q "decoder.query." "num_prototypes" i64
                  PrototypeHeads = i64 q "decoder.query." "prototype_heads" } } }
        |> checkRanges

    /// Compact JSON text of a config.
    let toText (c: VctConfig) = (toJson c).ToJsonString(JsonSerializerOptions(WriteIndented = true))

    /// Parses JSON text; `source` names the file in error messages.
    let ofText (source: string) (text: string) =
        let node =
            try JsonNode.Parse text
            with e -> raise (InvalidDataException $"{source}: not valid JSON ({e.Message})")
        match node with
        | :? JsonObject as o ->
            let mutable inner: JsonNode = null
            let o = if o.TryGetPropertyValue("config", &inner) && (inner :? JsonObject) then inner.AsObject() else o
            try ofJson o with :? InvalidDataException as e -> raise (InvalidDataException $"{source}: {e.Message}")
        | _ -> raise (InvalidDataException $"{source}: expected a JSON object")

/// Loading and saving VCT weights: the released PyTorch checkpoints and our own safetensors files.
[<RequireQualifiedAccess>]
module ModelIO =
    /// Keys of a released checkpoint that the model does not hold (docs/architecture.md §14.3): the criterion's
    /// training-only `empty_weight` / `logit_scale`, and VGGish's FC `embeddings` that VCT never applies.
    let isDocumentedUnused (key: string) =
        key.StartsWith("criterion.", StringComparison.Ordinal)
        || key.StartsWith("audio_backbone.embeddings.", StringComparison.Ordinal)

    /// Options for official checkpoints: strict, the documented unused keys dropped (and reported as such).
    let officialOptions =
        { LoadOptions.Default with Remap = fun k -> if isDocumentedUnused k then None else Some k }

    /// Loads a released `model_best.pth` (detectron2 format, CPU or GPU saved) or any state dict with the
    /// official names into `model`; strict except the documented unused keys. Returns the report.
    let loadOfficialInto (path: string) (model: VctModel) : LoadReport =
        StateDict.loadFileInto officialOptions path model

    /// The JSON config file written beside a checkpoint: model.safetensors -> model.json.
    let configPathOf (checkpoint: string) = VctCheckpoint.configPathOf checkpoint

    /// Refuses a checkpoint path that its own config file would overwrite (`x.json`).
    let checkCheckpointPath (path: string) = VctCheckpoint.checkPath path

    /// Writes the model's weights in the Vct checkpoint format (`VctCheckpoint`: config JSON in the metadata and
    /// beside the file, each atomically); a `.json` checkpoint path is refused.
    let save (path: string) (model: VctModel) =
        VctCheckpoint.write path (Some(ConfigJson.toText model.Config)) true [] [ for kv in model.state_dict () -> kv.Key, kv.Value ]

    /// The config of one of our checkpoints: the JSON beside it, else the one in its metadata.
    let readConfig (path: string) : VctConfig =
        let source, text = VctCheckpoint.readConfigText path
        ConfigJson.ofText source text

    /// Builds a model of `cfg`, fills it with `load` and moves it to `device` in eval mode; disposed on failure.
    let private build (cfg: VctConfig) (load: VctModel -> LoadReport) (device: torch.Device) : VctModel * LoadReport =
        let model = new VctModel(cfg)
        try
            let report = load model
            model.``to``(device) |> ignore
            model.eval () |> ignore
            model, report
        with _ ->
            model.Dispose()
            reraise ()

    /// Loads one of our checkpoints (strict) onto `device`.
    let load (path: string) (device: torch.Device) : VctModel * LoadReport =
        Runtime.init () |> ignore
        if not (File.Exists path) then raise (FileNotFoundException($"checkpoint not found: {path}", path))
        build (readConfig path) (StateDict.loadFileInto LoadOptions.Default path) device

    /// Builds the released model of `subset` and loads an official checkpoint into it, on `device`.
    let loadOfficial (subset: Subset) (path: string) (device: torch.Device) : VctModel * LoadReport =
        Runtime.init () |> ignore
        build (VctConfig.Released subset) (loadOfficialInto path) device
