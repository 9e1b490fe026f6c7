# Regenerates classes.json: python UniversalSegLib/registry/_build_classes_json.py (run from the repo root).
# Edit the table here, not the JSON. SNOMED CT codes follow the DICOM/Slicer anatomy lists; review before clinical use.
import json

AS = ["SCT", "123037004", "Anatomical Structure"]
TISSUE = ["SCT", "85756007", "Tissue"]
MAS = ["SCT", "49755003", "Morphologically Altered Structure"]
LEFT = ["SCT", "7771000", "Left"]; RIGHT = ["SCT", "24028007", "Right"]
rows = []
def add(key, name, group, code, meaning, color, tid=None, lat=None, parents=(), post=None, syn=(), cat=AS, region=None, pair=None):
    t = {"category": cat, "type": ["SCT", code, meaning]}
    if lat == "left": t["modifier"] = LEFT
    if lat == "right": t["modifier"] = RIGHT
    if region: t["region"] = region
    rows.append({"key": key, "name": name, "prompt": name.lower(), "synonyms": list(syn), "group": group,
                 "laterality": lat, "parents": list(parents), "pair": pair, "color": color,
                 "terminology": t, "postprocess": post, "template_id": tid})
def paired(base, name, group, code, meaning, color, tid_l=None, tid_r=None, post="split_pair", syn=()):
    add(f"{base}_left", f"Left {name}", group, code, meaning, color, tid_l, "left", post=post, pair=f"{base}_right",
        syn=[f"{name} left"] + [f"left {s}" for s in syn])
    add(f"{base}_right", f"Right {name}", group, code, meaning, [min(255, c + 25) for c in color], tid_r, "right", post=post,
        pair=f"{base}_left", syn=[f"{name} right"] + [f"right {s}" for s in syn])
LC = "largest_component"; WP = "within_parents"
# --- the paper's 32-class template ---
add("spleen", "Spleen", "organ", "78961009", "Spleen", [157, 108, 162], 1, post=LC)
paired("kidney", "kidney", "organ", "64033007", "Kidney", [185, 102, 83], 3, 2)
add("gallbladder", "Gallbladder", "organ", "28231008", "Gallbladder", [139, 150, 98], 4, post=LC, syn=["gall bladder"])
add("esophagus", "Esophagus", "organ", "32849002", "Esophagus", [211, 171, 143], 5, post=LC, syn=["oesophagus"])
add("liver", "Liver", "organ", "10200004", "Liver", [221, 130, 101], 6, post=LC)
add("stomach", "Stomach", "organ", "69695003", "Stomach", [216, 132, 105], 7, post=LC)
add("aorta", "Aorta", "vessel", "15825003", "Aorta", [224, 97, 76], 8, post=LC)
add("inferior_vena_cava", "Inferior vena cava", "vessel", "64131007", "Inferior vena cava", [0, 151, 206], 9, post=LC, syn=["postcava", "IVC"])
add("portal_vein_and_splenic_vein", "Portal vein and splenic vein", "vessel", "32764006", "Portal vein", [0, 122, 171], 10, post=LC,
    syn=["portal vein", "splenic vein"])  # one tree: the splenic vein joins the superior mesenteric vein to form it
add("pancreas", "Pancreas", "organ", "15776009", "Pancreas", [249, 180, 111], 11, post=LC)
add("adrenal_gland_right", "Right adrenal gland", "organ", "23451007", "Adrenal gland", [244, 214, 49], 12, "right", post=LC, syn=["right suprarenal gland"])
add("adrenal_gland_left", "Left adrenal gland", "organ", "23451007", "Adrenal gland", [224, 194, 29], 13, "left", post=LC, syn=["left suprarenal gland"])
add("duodenum", "Duodenum", "organ", "38848004", "Duodenum", [255, 253, 229], 14)
add("hepatic_vessel", "Hepatic vessel", "vessel", "8993003", "Hepatic vein", [0, 161, 196], 15, parents=["liver"], post=WP, syn=["hepatic vein", "liver vessel"])
add("lung_right", "Right lung", "organ", "39607008", "Lung", [197, 165, 145], 16, "right", post="split_pair", pair="lung_left")
add("lung_left", "Left lung", "organ", "39607008", "Lung", [177, 145, 125], 17, "left", post="split_pair", pair="lung_right")
add("colon", "Colon", "organ", "71854001", "Colon", [204, 168, 143], 18, syn=["large bowel", "large intestine"])
add("intestine", "Intestine", "organ", "30315005", "Small intestine", [205, 167, 142], 19, syn=["small bowel", "small intestine", "bowel"])
add("rectum", "Rectum", "organ", "34402009", "Rectum", [217, 163, 141], 20, post=LC)
add("urinary_bladder", "Urinary bladder", "organ", "89837001", "Urinary bladder", [222, 154, 132], 21, post=LC, syn=["bladder"])
add("prostate_or_uterus", "Prostate or uterus", "organ", "41216001", "Prostate", [230, 158, 140], 22, post=LC, syn=["prostate", "uterus"])
add("femur_head_left", "Left head of femur", "bone", "29627003", "Head of femur", [255, 238, 170], 23, "left", post=LC, syn=["left femoral head"])
add("femur_head_right", "Right head of femur", "bone", "29627003", "Head of femur", [255, 248, 190], 24, "right", post=LC, syn=["right femoral head"])
add("celiac_trunk", "Celiac trunk", "vessel", "57850000", "Celiac artery", [240, 80, 70], 25, syn=["coeliac trunk", "celiac artery"])
NEO = ("108369006", "Neoplasm")
add("kidney_tumor", "Kidney tumor", "tumour", *NEO, [255, 85, 0], 26, parents=["kidney_left", "kidney_right"], post=WP, cat=MAS, region=["SCT", "64033007", "Kidney"], syn=["renal tumor", "kidney tumour"])
add("liver_tumor", "Liver tumor", "tumour", *NEO, [255, 60, 0], 27, parents=["liver"], post=WP, cat=MAS, region=["SCT", "10200004", "Liver"], syn=["liver tumour", "hepatic tumor", "liver lesion"])
add("pancreas_tumor", "Pancreas tumor", "tumour", *NEO, [255, 120, 0], 28, parents=["pancreas"], post=WP, cat=MAS, region=["SCT", "15776009", "Pancreas"], syn=["pancreatic tumor", "pancreas tumour"])
add("hepatic_vessel_tumor", "Hepatic vessel tumor", "tumour", *NEO, [255, 40, 80], 29, parents=["liver"], post=WP, cat=MAS, region=["SCT", "8993003", "Hepatic vein"], syn=["hepatic vessel tumour"])
add("lung_tumor", "Lung tumor", "tumour", *NEO, [255, 100, 100], 30, parents=["lung_left", "lung_right"], post=WP, cat=MAS, region=["SCT", "39607008", "Lung"], syn=["lung tumour", "lung nodule"])
add("colon_tumor", "Colon tumor", "tumour", *NEO, [255, 140, 60], 31, parents=["colon"], post=WP, cat=MAS, region=["SCT", "71854001", "Colon"], syn=["colon tumour", "colon cancer"])
add("kidney_cyst", "Kidney cyst", "tumour", "367643001", "Cyst", [255, 220, 90], 32, parents=["kidney_left", "kidney_right"], post=WP, cat=MAS, region=["SCT", "64033007", "Kidney"], syn=["renal cyst"])
# --- further structures labelled in ../shared/data (TotalSegmentator silver standard) ---
add("heart", "Heart", "organ", "80891009", "Heart", [206, 110, 84], post=LC)
add("pulmonary_artery", "Pulmonary artery", "vessel", "81040000", "Pulmonary artery", [0, 122, 171], post=LC, syn=["pulmonary trunk"])
add("superior_mesenteric_artery", "Superior mesenteric artery", "vessel", "42258001", "Superior mesenteric artery", [255, 100, 80], syn=["SMA"])
add("brachiocephalic_trunk", "Brachiocephalic trunk", "vessel", "12691009", "Brachiocephalic trunk", [196, 121, 79], syn=["innominate artery"])
paired("subclavian_artery", "subclavian artery", "vessel", "36765005", "Subclavian artery", [176, 50, 50], post=None)
paired("common_carotid_artery", "common carotid artery", "vessel", "32062004", "Common carotid artery", [200, 60, 60], post=None)
add("superior_vena_cava", "Superior vena cava", "vessel", "48345005", "Superior vena cava", [0, 141, 196], post=LC, syn=["SVC"])
paired("iliac_artery", "common iliac artery", "vessel", "73634005", "Common iliac artery", [216, 101, 79], post=None, syn=["iliac artery"])
paired("iliac_vena", "common iliac vein", "vessel", "46027005", "Common iliac vein", [0, 151, 206], post=None, syn=["iliac vein"])
add("trachea", "Trachea", "organ", "44567001", "Trachea", [182, 228, 255], post=LC)
VERT = {"T10": "7610001", "T11": "12989008", "T12": "23215003", "L1": "66794005", "L2": "14293000",
        "L3": "36470004", "L4": "11994002", "L5": "49668003"}
for lvl, code in VERT.items():
    add(f"vertebrae_{lvl}", f"Vertebra {lvl}", "bone", code, f"{lvl} vertebra", [255, 255, 207 - 8 * len(rows) % 60], post=LC, syn=[f"{lvl} vertebra", f"{lvl}"])
add("sacrum", "Sacrum", "bone", "54735007", "Sacrum", [241, 214, 145], post=LC)
paired("femur", "femur", "bone", "71341001", "Femur", [255, 238, 170], post="split_pair", syn=["thigh bone"])
paired("hip", "hip bone", "bone", "29836001", "Hip", [212, 188, 102], post="split_pair", syn=["pelvic bone", "os coxae"])
add("spinal_cord", "Spinal cord", "other", "2748008", "Spinal cord", [244, 214, 49], post=LC)
paired("gluteus_maximus", "gluteus maximus", "muscle", "181674001", "Gluteus maximus muscle", [188, 95, 76], post="split_pair")
paired("iliopsoas", "iliopsoas", "muscle", "68455001", "Iliopsoas muscle", [170, 85, 70], post="split_pair", syn=["psoas"])
paired("autochthon", "autochthonous back muscle", "muscle", "44947003", "Erector spinae muscle", [160, 80, 66], post="split_pair", syn=["erector spinae"])
# --- where each structure may lie (ClassInfo.location; inference/plausibility.py) ---
# Every class lies in the trunk (the default). "lateral": the centroid's signed distance from the
# body midline in trunk half-widths, patient left positive; ranges hold scans A, B and C's labels
# with room to spare (A: liver -0.43, spleen 0.64, kidneys -0.44/0.43; B, cut to 180 mm: aorta 0.33,
# left subclavian 0.64). "caudal_to": classes whose centroids lie above this one's.
def mirrored(lo, hi): return [-hi, -lo]
LEFT_SIDED = {"spleen": [0.1, 1.2], "kidney_left": [0.05, 1.1], "adrenal_gland_left": [0.0, 0.9],
              "lung_left": [0.05, 1.2], "iliac_artery_left": [0.0, 0.8], "iliac_vena_left": [0.0, 0.8],
              "femur_left": [0.15, 1.3], "femur_head_left": [0.15, 1.3], "hip_left": [0.1, 1.1],
              "gluteus_maximus_left": [0.1, 1.2], "iliopsoas_left": [0.05, 1.0], "autochthon_left": [0.0, 0.7],
              "subclavian_artery_left": [0.0, 1.3], "common_carotid_artery_left": [-0.05, 0.9]}
LATERAL = {**LEFT_SIDED, **{k.replace("_left", "_right"): mirrored(*v) for k, v in LEFT_SIDED.items() if k.endswith("_left")},
           "liver": [-1.2, 0.3], "gallbladder": [-1.1, 0.2], "stomach": [-0.3, 1.1], "duodenum": [-0.8, 0.4],
           "pancreas": [-0.4, 0.8], "colon": [-0.7, 0.7], "intestine": [-0.7, 0.7], "rectum": [-0.35, 0.35],
           "urinary_bladder": [-0.4, 0.4], "prostate_or_uterus": [-0.3, 0.3], "esophagus": [-0.3, 0.45],
           "trachea": [-0.3, 0.3], "heart": [-0.5, 0.7], "pulmonary_artery": [-0.4, 0.6], "aorta": [-0.3, 0.6],
           "inferior_vena_cava": [-0.6, 0.2], "superior_vena_cava": [-0.7, 0.1],
           "portal_vein_and_splenic_vein": [-0.5, 0.6], "celiac_trunk": [-0.3, 0.45],
           "superior_mesenteric_artery": [-0.3, 0.45], "brachiocephalic_trunk": [-0.6, 0.3],
           "sacrum": [-0.2, 0.2], "spinal_cord": [-0.2, 0.2], **{f"vertebrae_{lvl}": [-0.2, 0.2] for lvl in VERT}}
LEVELS = [f"vertebrae_{lvl}" for lvl in VERT]  # top down
CAUDAL_TO = {key: LEVELS[:i] for i, key in enumerate(LEVELS) if i}
CAUDAL_TO.update({"sacrum": LEVELS, "liver": ["heart"], "spleen": ["heart"],
                  "kidney_left": ["heart"], "kidney_right": ["heart"],
                  "urinary_bladder": ["kidney_left", "kidney_right"], "prostate_or_uterus": ["urinary_bladder"],
                  "iliac_artery_left": ["aorta"], "iliac_artery_right": ["aorta"],
                  "iliac_vena_left": ["inferior_vena_cava"], "iliac_vena_right": ["inferior_vena_cava"]})
for r in rows:
    r["location"] = {"trunk": True, **({"lateral": LATERAL[r["key"]]} if r["key"] in LATERAL else {}),
                     **({"caudal_to": CAUDAL_TO[r["key"]]} if r["key"] in CAUDAL_TO else {})}
keys = [r["key"] for r in rows]; assert len(keys) == len(set(keys))
for r in rows:
    r["prompt"] = r["name"].lower()
    for p in r["parents"] + ([r["pair"]] if r["pair"] else []) + r["location"].get("caudal_to", []): assert p in keys, p
json.dump({"format": 1, "prompt_template": "A computerized tomography of a {name}", "classes": rows},
          open("UniversalSegLib/registry/classes.json", "w"), indent=1)
print(len(rows))
