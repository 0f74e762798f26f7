# The key broker's release policy (embassy broker serve): which attested, sealed workload
# may have which model's weights key. Deny by default; the first failing condition, in the
# order of `checks`, is the reason a denial names.
#
# input (built by the broker from verified evidence only; docs/protocol.md, "Key broker"):
#   attestation: {valid, measurement, tpm_kind, boot_pcrs: {"4": hex, ...}, ak_certified}
#   workload:    {image_digest, launch_digest, name} or null (no workload launched)
#   sealed:      true if a sealed session is open at the evidence's head
#   request:     {model_id, key_id, tenant, operation}
#   embassy_keyid
# data.broker (data.json): tenants -> models they may run; per model the image digests and
# embassy measurements allowed to load it; require_sealed.
package embassy.weights

import rego.v1

default allow := false

model := data.broker.models[input.request.model_id]

failed contains "attestation-invalid" if not input.attestation.valid == true

failed contains "operation-not-allowed" if input.request.operation != "decrypt-for-load"

failed contains "model-not-for-tenant" if {
	not input.request.model_id in object.get(data.broker.tenants, input.request.tenant, [])
}

failed contains "model-not-for-tenant" if not model

failed contains "image-not-allowed" if not input.workload.image_digest in model.image_digests

failed contains "measurement-not-allowed" if {
	not input.attestation.measurement in model.measurements
}

failed contains "not-sealed" if {
	object.get(data.broker, "require_sealed", true) != false
	not input.sealed == true
}

checks := [
	"attestation-invalid",
	"operation-not-allowed",
	"model-not-for-tenant",
	"image-not-allowed",
	"measurement-not-allowed",
	"not-sealed",
]

deny_reason := [reason | some reason in checks; reason in failed][0]

allow if count(failed) == 0
