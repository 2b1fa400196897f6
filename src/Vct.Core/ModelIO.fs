namespace Vct.Core

open Vct.Core.Checkpoint
open Vct.Core.Platform
open System
open System.Collections.Generic
open System.IO
open System.Text.Json
open System.Text.Json.Nodes
open System.Text.Json.Serialization
open Microsoft.FSharp.Reflection
open TorchSharp
open Vct.Core.Backbone
open Vct.Core.Fusion
open Vct.Core.PixelDecoder
open Vct.Core.QueryGen
open Vct.Core.Decoder
open Vct.Core.Layers

/// VctConfig <-> JSON through System.Text.Json: the record fields in snake_case (`image_size`, `swin.patch_size`),
/// options as null, the subset as "s4" / "ms3" / "avss". Reading fails naming the missing or malformed field.
[<RequireQualifiedAccess>]
module ConfigJson =
    /// The subset by its name (read through `Subset.Parse`, so any case and "ss" are accepted).
    type private SubsetConverter() =
        inherit JsonConverter<Subset>()
        override _.Read(reader, _, _) =
            let text = if reader.TokenType = JsonTokenType.String then reader.GetString() else null
            try Subset.Parse text with :? ArgumentException as e -> raise (JsonException e.Message)
        override _.Write(writer, value, _) = writer.WriteStringValue value.Name

    let private options =
        let o = JsonSerializerOptions(PropertyNamingPolicy = JsonNamingPolicy.SnakeCaseLower, WriteIndented = true)
        o.Converters.Add(SubsetConverter())
        o.Converters.Add(JsonFSharpConverter())
        o

    /// The config as a JSON object.
    let toJson (c: VctConfig) : JsonObject = JsonSerializer.SerializeToNode(c, options).AsObject()

    /// The first field of `node` that does not fit type `t` (the serializer's own messages do not name nested
    /// fields): "missing field 'decoder.num_queries'" or "field 'image_size' is malformed (...)".
    let rec private locate (t: Type) (node: JsonNode) (name: string) : string option =
        let isOption (t: Type) = t.IsGenericType && t.GetGenericTypeDefinition() = typedefof<option<_>>
        let shown (n: JsonNode) =
            let text = if isNull n then "null" else n.ToJsonString()
            if text.Length > 40 then text.Substring(0, 40) + "..." else text
        let malformed (expected: string) = Some $"field '{name}' is malformed (expected {expected}, got {shown node})"
        if isOption t then
            if isNull node then None else locate (t.GetGenericArguments()[0]) node name
        elif FSharpType.IsRecord t then
            match node with
            | :? JsonObject as o ->
                FSharpType.GetRecordFields t
                |> Array.tryPick (fun f ->
                    let key = JsonNamingPolicy.SnakeCaseLower.ConvertName f.Name
                    let full = if name = "" then key else $"{name}.{key}"
                    let mutable v: JsonNode = null
                    if not (o.TryGetPropertyValue(key, &v)) && not (isOption f.PropertyType) then Some $"missing field '{full}'"
                    else locate f.PropertyType v full)
            | _ -> malformed "an object"
        else
            let expected =
                if t = typeof<int64> || t = typeof<int> then "an integer"
                elif t = typeof<float> then "a number"
                elif t = typeof<bool> then "true or false"
                elif t.IsArray then "an array of integers"
                elif t = typeof<Subset> then "\"s4\", \"ms3\" or \"avss\""
                else t.Name
            try
                if isNull node || isNull (JsonSerializer.Deserialize(node, t, options)) then malformed expected else None
            with _ -> malformed expected

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
        let config =
            try JsonSerializer.Deserialize<VctConfig>(o, options)
            with :? JsonException as e ->
                match locate typeof<VctConfig> o "" with
                | Some problem -> raise (InvalidDataException $"config: {problem}")
                | None -> raise (InvalidDataException $"config: {e.Message}")
        checkRanges config

    /// Indented JSON text of a config.
    let toText (c: VctConfig) = JsonSerializer.Serialize(c, options)

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
